"""Run rendered `solution_code` in a separate, locked-down Python process; never in ours.

    >>> run_solutions(["def solution():\\n    return 6 * 7\\n"])
    [SandboxResult(ok=True, value=42, error=None)]

Each call starts one child `python -I -S -c <our fixed runner>` (isolated mode: no site-packages, no user
env vars) and sends it every code in the batch on stdin, so the start-up (~20 ms) is paid once per batch.
The child:
  * runs with an EMPTY environment, in a fresh empty temporary directory, in its own session;
  * sets its resource limits first thing, before it reads any code (not in a preexec_fn, which is unsafe
    when the parent runs sandboxes from several threads): RLIMIT_AS (memory), RLIMIT_CPU (seconds for the
    whole batch), RLIMIT_NOFILE (no new descriptors beyond a few), RLIMIT_FSIZE = 0 (cannot write files),
    RLIMIT_NPROC = 0 where the kernel honours it (no fork), RLIMIT_CORE = 0;
  * on Linux tries `unshare(CLONE_NEWUSER | CLONE_NEWNET)` so it has no network at all; this is best effort
    (containers often forbid it), the other limits do not depend on it;
  * executes each code with a reduced set of builtins whose `__import__` admits only math and fractions
    (defence in depth: the code is rendered from whitelisted expressions, not written by the model);
  * stops each `solution()` after `timeout_s` with an interval timer, and reports one line per code
    ("<i> int 42", "<i> float 0.5", "<i> frac 1/3", or "<i> error" and its text, unicode_escape'd), buffered (no write
    system call per code); plain text, not a JSON object per line, which cost ~4 us a code both ends.
If the child dies (CPU limit, a C-level loop, a crash), its unflushed lines are lost, so the codes it did not
report are run again in a careful child that flushes after each code; the code that kills that one gets
`killed`, and the rest of the batch goes on in a new child. The parent enforces a wall-clock timeout as well.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction

LIMITS = r'''
import sys
def _sdg_limits(mem_bytes, cpu_s):
    import resource
    for res, val in ((resource.RLIMIT_AS, mem_bytes), (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_FSIZE, 0),
                     (resource.RLIMIT_NOFILE, 16), (resource.RLIMIT_CORE, 0),
                     (getattr(resource, "RLIMIT_NPROC", None), 0)):
        if res is None:
            continue
        try:
            hard = val if res != resource.RLIMIT_CPU else val + 1  # soft CPU limit sends SIGXCPU first
            resource.setrlimit(res, (val, hard))
        except (ValueError, OSError):
            pass
_sdg_limits(int(sys.argv[1]), int(sys.argv[2]))
del _sdg_limits
'''
"""The first lines of every sandbox child (ours and legacy.py's): its resource limits, from argv[1] (bytes of
address space) and argv[2] (CPU seconds), set before it reads any code."""

_RUNNER = LIMITS + r'''
import signal, math  # no json, no fractions: each costs the child milliseconds of start-up, paid per batch
try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    _NET_ISOLATED = _libc.unshare(0x10000000 | 0x40000000) == 0   # CLONE_NEWUSER | CLONE_NEWNET
except Exception:
    _NET_ISOLATED = False
_data = sys.stdin.buffer.read().decode("utf-8")  # "<timeout> <careful 0|1>\n", then "<length>\n<code>" each
sys.stdin.close()
_head, _at = _data.split("\n", 1)[0], _data.index("\n") + 1
timeout = float(_head.split()[0])
careful = _head.split()[1] == "1"  # flush after every code (a retry after a child died: find the culprit)
def _codes(data, at):
    while at < len(data):
        nl = data.index("\n", at)
        n = int(data[at:nl])
        yield data[nl + 1:nl + 1 + n]
        at = nl + 1 + n
_real_import = __import__
def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name.split(".")[0] not in ("math", "fractions"):
        raise ImportError("import of %r is not allowed in the sandbox" % name)
    return _real_import(name, globals, locals, fromlist, level)
import builtins as _b
_SAFE = {k: getattr(_b, k) for k in (
    "abs", "min", "max", "round", "int", "float", "bool", "str", "range", "len", "sum", "divmod", "pow",
    "isinstance", "list", "tuple", "dict", "set", "enumerate", "zip", "map", "filter", "sorted", "reversed",
    "True", "False", "None", "ArithmeticError", "ZeroDivisionError", "ValueError", "TypeError", "Exception",
    "OverflowError", "MemoryError", "print")}
_SAFE["__import__"] = _import
class _Timeout(BaseException):
    pass
def _alarm(signum, frame):
    raise _Timeout()
signal.signal(signal.SIGALRM, _alarm)
import os
out = os.fdopen(os.dup(1), "w")  # the result lines; a code's print() goes to stderr, never among them
sys.stdout = sys.stderr
def _error(i, text):
    return "%d error %s\n" % (i, text.encode("unicode_escape").decode("ascii"))
for i, code in enumerate(_codes(_data, _at)):
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        g = {"__builtins__": dict(_SAFE), "__name__": "solution"}
        exec(compile(code, "<solution>", "exec"), g)
        v = g["solution"]()
        signal.setitimer(signal.ITIMER_REAL, 0)
        if type(v) is int:
            line = "%d int %s\n" % (i, str(v))
        elif isinstance(v, bool):
            line = _error(i, "returned a bool")
        elif isinstance(v, int):
            line = "%d int %s\n" % (i, str(int(v)))
        elif isinstance(v, float):
            line = "%d float %r\n" % (i, v)
        elif "fractions" in sys.modules and isinstance(v, sys.modules["fractions"].Fraction):
            line = "%d frac %d/%d\n" % (i, v.numerator, v.denominator)
        else:
            line = _error(i, "returned %s" % type(v).__name__)
    except _Timeout:
        line = _error(i, "timeout")
    except MemoryError:
        signal.setitimer(signal.ITIMER_REAL, 0)
        line = _error(i, "memory")
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        line = _error(i, "%s: %s" % (type(e).__name__, str(e)[:200]))
    out.write(line)
    if careful:
        out.flush()
out.flush()
'''


@dataclass(frozen=True)
class SandboxResult:
    """One code's outcome: ok with an int/float/Fraction value, or an error ('timeout', 'memory', 'killed',
    'ImportError: ...', ...)."""
    ok: bool
    value: int | float | Fraction | None = None
    error: str | None = None


def _decode(kind: str, text: str) -> SandboxResult:
    """One line of the child's past its index: "int 42", "float 0.5", "frac 1/3", "error <text, unicode_escape'd>"."""
    if kind == "int":
        return SandboxResult(True, int(text))
    if kind == "float":
        return SandboxResult(True, float(text))
    if kind == "frac":
        return SandboxResult(True, Fraction(text))
    return SandboxResult(False, error=text.encode("ascii").decode("unicode_escape"))


def run_solutions(codes: list[str], *, timeout_s: float = 1.0, mem_mb: int = 256, batch_timeout_s: float | None = None,
                  python: str | None = None) -> list[SandboxResult]:
    """Run each code's `solution()` in a sandboxed child process; results in input order.

    timeout_s        wall-clock seconds one solution() may take
    mem_mb           address-space limit of the child
    batch_timeout_s  wall-clock limit of one child (default: 5 + timeout_s * len(codes))
    """
    results: list[SandboxResult | None] = [None] * len(codes)
    start, careful = 0, False
    while start < len(codes):
        pending = codes[start:]
        limit = batch_timeout_s or 5.0 + timeout_s * len(pending)
        stdout = _child(pending, timeout_s=timeout_s, mem_mb=mem_mb, limit=limit, careful=careful, python=python)
        done = 0
        # a line is whole only where a newline follows it: a child that died may have left half of one
        for line in stdout.split("\n")[:-1]:
            try:
                i, kind, text = line.split(" ", 2)
                i, result = int(i), _decode(kind, text)
            except ValueError:  # not one of ours (a code that printed): from here on, as if the child died
                break
            if i != done:  # lines come in order: anything else is not the child's report
                break
            results[start + i] = result
            done = i + 1
        if done < len(pending):
            if careful:  # the careful child died on pending[done]: mark it, go on with the rest
                results[start + done] = SandboxResult(False, error="killed")
                done += 1
            careful = not careful  # after a death, find its code carefully; after that, fast again
        start += done
    return results  # type: ignore[return-value]


def _payload(codes: list[str], timeout_s: float, careful: bool) -> str:
    """The child's stdin (as UTF-8, whatever the locales): "<timeout> <careful>" on the first line, then each
    code as "<length in characters>\n<code>"."""
    return f"{timeout_s!r} {int(careful)}\n" + "".join(f"{len(code)}\n{code}" for code in codes)


def _child(codes: list[str], *, timeout_s: float, mem_mb: int, limit: float, careful: bool,
           python: str | None) -> str:
    """One sandboxed child over `codes`: what it wrote to stdout (all of it, or up to where it died)."""
    with tempfile.TemporaryDirectory(prefix="tdg-sandbox-") as cwd:
        try:
            proc = subprocess.run(
                [python or sys.executable, "-I", "-S", "-c", _RUNNER, str(mem_mb * 2**20), str(int(limit) + 1)],
                input=_payload(codes, timeout_s, careful).encode(), capture_output=True,
                env={}, cwd=cwd, timeout=limit, start_new_session=True, close_fds=True)
            return proc.stdout.decode("ascii", "replace")  # the child writes ASCII (errors unicode_escape'd)
        except subprocess.TimeoutExpired as e:  # subprocess.run kills the child
            return (e.stdout or b"").decode("ascii", "replace")


def same_answer(got: int | float | Fraction | None, exact: Fraction, *, rel: float = 1e-9) -> bool:
    """Does a sandbox value equal the exact answer? ints/Fractions exactly; floats within `rel` (relative,
    at least 1e-9 absolute) since solution_code uses float arithmetic like TemplateGSM's code."""
    if got is None:
        return False
    if isinstance(got, float):
        return abs(got - float(exact)) <= rel * max(1.0, abs(float(exact)))
    return Fraction(got) == exact
