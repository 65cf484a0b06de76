"""What the command-line tests share."""

from rankcut.cli import main


def run(capsys, *argv):
    """``rankcut ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
