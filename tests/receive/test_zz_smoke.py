from pathlib import Path
from receive.conftest import inprocess_scp, send, storescu
from receive.dicomgen import cine, save
import time
def test_smoke(tmp_path):
    with inprocess_scp(tmp_path/"d") as r:
        files=[save(cine(s, frames=4), tmp_path/f"{s}.dcm") for s in ["raw","jpeg","j2k","rle","deflate"]]
        t=time.time()
        print(send(r.port, files), time.time()-t)
        print(storescu(r.port, files[0], files[1]))
        print([ (i.state, i.transfer_syntax_uid) for i in r.instances()], r.queued_job_ids(), [j.id for j in r.jobs()], r.temp_files())
