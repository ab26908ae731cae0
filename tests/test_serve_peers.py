"""bench/serve_peers.py without its peers' venv: the help, and one error line when it is missing."""
import subprocess
import sys


def test_the_peers_benchmark_helps_and_says_what_to_do_without_its_venv(tmp_path):
    done = subprocess.run([sys.executable, "bench/serve_peers.py", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "MLServer" in done.stdout and "--setup" in done.stdout
    done = subprocess.run([sys.executable, "bench/serve_peers.py", "--peers-venv", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no peers' venv at") and "--setup" in done.stderr
    assert "Traceback" not in done.stderr
