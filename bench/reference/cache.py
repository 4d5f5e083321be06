"""What the long-running bench references share: the test references' configs on sys.path, and
the model cache every bench writes once and then reloads."""
import json
import os
import shutil
import sys

# test/reference/common.py holds the configs the fixtures use (the tiny UNet, SD1.5's scheduler).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "test", "reference"))


def ensure_cache(cache, version, write):
    """Runs write(tmp_dir) once per version; a partial or stale cache is replaced as a whole."""
    stamp = os.path.join(cache, "version.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("version") == version:
                return
    tmp = f"{cache}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    with open(os.path.join(tmp, "version.json"), "w") as f:
        json.dump({"version": version}, f)
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    os.rename(tmp, cache)
