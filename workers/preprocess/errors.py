"""The one exception type for input the pipeline cannot use."""


class InputError(ValueError):
    """The dataset cannot be analysed (wrong SOP class, no or undecodable pixels, ...).

    Messages name the problem, never patient data, because they reach logs and API responses.
    """
