"""The stateful campaign (tests/stateful_campaign.py) in a subprocess: random sequences of
API calls, attribute changes, array abuse and threads on one network and trainer, with
zero crashes. A crash fails this test instead of killing pytest."""
import os
import subprocess
import sys

import pytest

import cprop

pytest.importorskip("hypothesis")
CAMPAIGN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stateful_campaign.py")


@pytest.mark.parametrize("seed", [0, 1])
def test_stateful_campaign_never_crashes(seed):
    # the subprocess imports the cprop under test, wherever it was imported from here
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cprop.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, CAMPAIGN, "150", str(seed)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "no crash" in proc.stdout
    # a kernel error inside nogil code (the bounds-checked build's IndexError) is only printed
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
