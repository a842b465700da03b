"""Shared assertion for command-line tests: bad input is one clean line on stderr and exit code 2."""


def assert_one_line_error(proc, *fragments):
    """`proc` (a finished subprocess.run with text output) failed with exit 2 and one stderr line
    holding every fragment."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
