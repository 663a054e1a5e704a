-- Orthanc auto-routing rule: forward every incoming ultrasound instance to lusai, once.
-- lusai's own outputs (SEG, SR, secondary captures from AE "LUSAI") are not sent back.
-- Install: list this file in Orthanc's "LuaScripts" and declare lusai in "DicomModalities"
-- under the name "lusai" (see docker-compose.yml and docs/deployment.md).

function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags["Modality"]
  local aet = metadata["RemoteAET"] or ""
  if modality == "US" and aet ~= "LUSAI" then
    -- SendToModality keeps the transfer syntax as stored (JPEG stays JPEG).
    SendToModality(instanceId, "lusai")
  end
end
