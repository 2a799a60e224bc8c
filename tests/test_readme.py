"""README.md, followed as a new user would (issue 22): every fenced shell block, in README
order, and every fenced Python block, runs on CPU and succeeds.

The blocks run in a scratch copy of the repository (what they write, such as out/, stays
there), from its root, with bash -e (a block fails at its first failing command), with
the virtual environment this test runs in first on PATH -- the one `make install` built.
The copy gets a .venv that points to that environment and counts as installed, so
`make train` trains without reinstalling.

Markers, HTML comments on the lines right before a block's opening fence:

  <!-- doc-test: skip REASON -->         the block does not run here (needs a GPU, a
                                         download, credentials...); the reason is required
  <!-- doc-test: env NAME=value ... -->  environment overrides for that block, as shell words
                                         (NAME="a b" for spaces): fewer steps through a
                                         variable the command documents, never another command
  <!-- doc-test: server PORT -->         the block starts a server: it runs in the background
                                         until http://127.0.0.1:PORT/health answers 200, and
                                         the blocks after it run against it
  <!-- doc-test: stop-server -->         (anywhere) stops that server; so does the end of the file

Shell blocks are those tagged bash, sh, shell or console; Python blocks are tagged python.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<kind>[\w-]+)(?P<rest>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w+-]*)\s*$")
# What the scratch copy leaves out: environments, build outputs, earlier runs' outputs.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "out", "out-*", "__pycache__", ".pytest_cache",
                                    ".benchmarks", "*.egg-info", ".doc-test")  # fmt: skip
BLOCK_TIMEOUT_S = 600  # one block; the README's own budget is far below (see test_readme_runs_as_written)
SERVER_START_TIMEOUT_S = 180


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    heading: str  # the section it is in
    skip: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    server_port: int | None = None
    stop_server_before: bool = False  # a stop-server marker came since the previous block

    @property
    def runs(self) -> bool:
        return self.skip is None and (self.language in SHELL_LANGUAGES or self.language == "python")

    def where(self) -> str:
        return f"README.md line {self.line} ({self.heading})"


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks with their markers. A marker that is malformed, unknown or not right
    before a fence (stop-server excepted) raises ValueError naming its line."""
    blocks: list[Block] = []
    pending: list[tuple[int, str, str]] = []  # markers waiting for their fence: (line, kind, rest)
    stop_pending = False
    heading = "top"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        fence = FENCE.match(line)
        if marker:
            kind, rest = marker["kind"], marker["rest"].strip()
            if kind == "stop-server":
                stop_pending = True
            elif kind in ("skip", "env", "server"):
                pending.append((i + 1, kind, rest))
            else:
                raise ValueError(f"README.md line {i + 1}: unknown doc-test marker {kind!r} "
                                 "(skip, env, server or stop-server)")  # fmt: skip
            i += 1
            continue
        if pending and not fence:
            raise ValueError(f"README.md line {pending[0][0]}: a doc-test marker must be right before a fence, "
                             f"but line {i + 1} is {line!r}")  # fmt: skip
        if line.startswith("#") and not fence:
            heading = line.lstrip("#").strip()
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"README.md line {i + 1}: the fence is never closed")
            indent = len(fence["indent"])
            code = "\n".join(body[indent:] if body[:indent].isspace() else body for body in lines[i + 1 : end])
            block = Block(i + 1, fence["language"], code + "\n", heading, stop_server_before=stop_pending)
            for marker_line, kind, rest in pending:
                apply_marker(block, marker_line, kind, rest)
            blocks.append(block)
            pending, stop_pending = [], False
            i = end + 1
            continue
        i += 1
    if pending:
        raise ValueError(f"README.md line {pending[0][0]}: a doc-test marker with no block after it")
    return blocks


def apply_marker(block: Block, line: int, kind: str, rest: str) -> None:
    if kind == "skip":
        if not rest:
            raise ValueError(f"README.md line {line}: doc-test: skip needs a reason")
        block.skip = rest
    elif kind == "server":
        if not rest.isdigit():
            raise ValueError(f"README.md line {line}: doc-test: server needs a port, got {rest!r}")
        block.server_port = int(rest)
    else:  # env
        for word in shlex.split(rest):
            name, equals, value = word.partition("=")
            if not equals or not re.fullmatch(r"[A-Za-z_]\w*", name):
                raise ValueError(f"README.md line {line}: doc-test: env takes NAME=value words, got {word!r}")
            block.env[name] = value


def scratch_copy(destination: Path) -> Path:
    """The repository copied to destination (modification times kept), with a .venv that is
    the running environment under another name, stamped installed after the copy so make
    does not reinstall."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("runs from the virtual environment make install builds (make test does)")
    shutil.copytree(REPO, destination, ignore=NOT_COPIED, symlinks=True)
    venv, real = destination / ".venv", Path(sys.prefix)
    venv.mkdir()
    for entry in real.iterdir():  # bin, lib, include...: the same files, not a new install
        if entry.name not in ("pyvenv.cfg", ".installed"):
            (venv / entry.name).symlink_to(entry)
    shutil.copy(real / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / ".installed").touch()  # newer than every copied source: make install has nothing to do
    return destination


def block_environment(block: Block) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
    env["MPLBACKEND"] = "Agg"
    for name in ("PYTEST_CURRENT_TEST", "TRITON_INTERPRET"):  # set for the test suite (conftest), not by a user
        env.pop(name, None)
    for name in [name for name in env if name.startswith("PYTEST_XDIST_")]:  # a README pytest is not an xdist worker
        del env[name]
    env.update(block.env)
    return env


def block_command(scratch: Path, block: Block, number: int) -> list[str]:
    suffix = "py" if block.language == "python" else "sh"
    script = scratch / ".doc-test" / f"block-{number:02d}-line-{block.line}.{suffix}"
    script.parent.mkdir(exist_ok=True)
    script.write_text(block.code)
    return [sys.executable, str(script)] if block.language == "python" else ["bash", "-e", str(script)]


def failure(block: Block, what: str, output: str) -> str:
    return (f"{block.where()}: {what}\n--- the block ---\n{block.code}--- its output (last 6000 characters) ---\n"
            f"{output[-6000:]}")  # fmt: skip


class Server:
    """A block that starts a server, run in the background in its own process group."""

    def __init__(self, block: Block, command: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.block, self.log = block, log
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip

    def wait_healthy(self) -> None:
        url = f"http://127.0.0.1:{self.block.server_port}/health"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(failure(self.block, f"the server exited ({self.process.returncode}) before {url} answered",
                                    self.output()))  # fmt: skip
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(failure(self.block, f"{url} did not answer 200 within {SERVER_START_TIMEOUT_S} s", self.output()))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def run_blocks(text: str, scratch: Path) -> list[tuple[Block, float, float]]:
    """Run the blocks of a README text in scratch, in order; pytest.fail at the first that
    fails, naming it with its output. Returns (block, wall seconds, CPU seconds of the
    processes it ran and that ended) for each block run."""
    timings = []
    server: Server | None = None
    try:
        for number, block in enumerate(parse_blocks(text), 1):
            if block.stop_server_before and server is not None:
                server.stop()
                server = None
            if not block.runs:
                continue
            env = block_environment(block)
            command = block_command(scratch, block, number)
            print(f"{block.where()}: {block.code.splitlines()[0][:80]}", flush=True)  # shown live with pytest -s
            started, cpu_started = time.monotonic(), children_cpu_seconds()
            if block.server_port is not None:
                if server is not None:
                    pytest.fail(f"{block.where()}: starts a server while another runs "
                                "(add <!-- doc-test: stop-server -->)")  # fmt: skip
                server = Server(block, command, scratch, env, scratch / ".doc-test" / f"server-{block.line}.log")
                server.wait_healthy()
            else:
                try:
                    result = subprocess.run(command, cwd=scratch, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)  # fmt: skip
                except subprocess.TimeoutExpired as error:
                    pytest.fail(failure(block, f"still running after {BLOCK_TIMEOUT_S} s",
                                        (error.output or b"").decode(errors="replace")))  # fmt: skip
                if result.returncode != 0:
                    pytest.fail(failure(block, f"exited with status {result.returncode}",
                                        result.stdout.decode(errors="replace")))  # fmt: skip
            timings.append((block, time.monotonic() - started, children_cpu_seconds() - cpu_started))
    finally:
        if server is not None:
            server.stop()
    return timings


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the README itself --------------------------------------------------------------------------


def test_readme_runs_as_written(tmp_path):
    """Every runnable block of README.md, in order, in a scratch copy of the repository. The
    time of each block is printed (pytest -s); the whole run stays under ~8 minutes on 2 cores."""
    scratch = scratch_copy(tmp_path / "repo")
    timings = run_blocks(README.read_text(), scratch)
    print(f"\nREADME blocks: {len(timings)} run in {sum(t[1] for t in timings):.0f} s "
          f"({sum(t[2] for t in timings):.0f} CPU seconds)")  # fmt: skip
    for block, wall, cpu in timings:
        print(f"  {wall:6.1f} s {cpu:6.1f} CPU s  line {block.line:4d}  {block.code.splitlines()[0][:80]}")


def test_readme_markers_are_well_formed_and_skips_give_a_reason():
    blocks = parse_blocks(README.read_text())  # raises on a malformed or stray marker
    assert any(block.runs and block.language in SHELL_LANGUAGES for block in blocks)
    for block in blocks:
        assert block.language, f"{block.where()}: a fence without a language (bash, python, text...)"
        if re.search(r"^\s*make\s+test\b", block.code, re.M):
            assert block.skip, f"{block.where()}: make test runs this test; it must be skipped, not recursed into"


def test_readme_first_steps_put_the_commands_on_path():
    """A new user's first block ends with the commands on PATH, and says how."""
    text = README.read_text()
    first = next(block for block in parse_blocks(text) if block.language in SHELL_LANGUAGES)
    assert "make train" in first.code and "source .venv/bin/activate" in first.code, first.code


# --- the harness, on small READMEs --------------------------------------------------------------


def test_markers_parse():
    text = (
        "# A\n<!-- doc-test: skip needs a GPU -->\n```bash\nnvidia-smi\n```\n"
        "## B\n<!-- doc-test: env STEPS=3 ARGS=\"--a 1\" -->\n```bash\n  echo $STEPS\n```\n"
        "<!-- doc-test: server 8123 -->\n```sh\nserve\n```\n<!-- doc-test: stop-server -->\n"
        "```python\nprint(1)\n```\n```text\nnot run\n```\n<!-- doc-test: stop-server -->\n"
    )
    blocks = parse_blocks(text)
    assert [b.language for b in blocks] == ["bash", "bash", "sh", "python", "text"]
    assert blocks[0].skip == "needs a GPU" and not blocks[0].runs and blocks[0].heading == "A"
    assert blocks[1].env == {"STEPS": "3", "ARGS": "--a 1"} and blocks[1].heading == "B" and blocks[1].line == 8
    assert blocks[2].server_port == 8123 and blocks[3].stop_server_before and not blocks[2].stop_server_before
    assert not blocks[4].runs


@pytest.mark.parametrize("text, message", [
    ("<!-- doc-test: skip -->\n```bash\nx\n```\n", "needs a reason"),
    ("<!-- doc-test: skip GPU -->\n\n```bash\nx\n```\n", "right before a fence"),
    ("<!-- doc-test: skipp GPU -->\n```bash\nx\n```\n", "unknown doc-test marker 'skipp'"),
    ("<!-- doc-test: server http -->\n```bash\nx\n```\n", "needs a port"),
    ("<!-- doc-test: env 1X=2 -->\n```bash\nx\n```\n", "NAME=value"),
    ("```bash\nx\n", "never closed"),
    ("```bash\nx\n```\n<!-- doc-test: env A=1 -->\n", "no block after it"),
])  # fmt: skip
def test_bad_markers_are_refused_with_their_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_blocks(text)


def test_blocks_run_in_order_with_env_and_stop_at_the_first_failure(tmp_path):
    text = (
        "```bash\necho one > order.txt\n```\n"
        "<!-- doc-test: env WORD=two -->\n```bash\necho $WORD >> order.txt\n```\n"
        "```python\nopen('order.txt', 'a').write('three\\n')\n```\n"
        "<!-- doc-test: skip not here -->\n```bash\nexit 3\n```\n"
        "```bash\nfalse\necho not reached >> order.txt\n```\n"
        "```bash\necho nor this >> order.txt\n```\n"
    )
    with pytest.raises(pytest.fail.Exception) as failed:
        run_blocks(text, tmp_path)
    message = str(failed.value)
    assert message.startswith("README.md line 15 (top): exited with status 1") and "false" in message
    assert (tmp_path / "order.txt").read_text() == "one\ntwo\nthree\n"


def test_a_server_block_serves_the_blocks_after_it_until_stop_server(tmp_path):
    port = free_port()
    server = (f"from http.server import BaseHTTPRequestHandler, HTTPServer\n"
              f"class H(BaseHTTPRequestHandler):\n"
              f"    def do_GET(self):\n"
              f"        self.send_response(200); self.end_headers(); self.wfile.write(b'ok ' + self.path.encode())\n"
              f"HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")  # fmt: skip
    (tmp_path / "server.py").write_text(server)
    text = (
        f"<!-- doc-test: server {port} -->\n```bash\npython server.py\n```\n"
        f"```bash\npython -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/x').read())\""
        " > got.txt\n```\n"
        "<!-- doc-test: stop-server -->\n"
        f"```bash\n! python -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/x', timeout=5)\"\n```\n"
    )
    run_blocks(text, tmp_path)
    assert (tmp_path / "got.txt").read_text().strip() == "b'ok /x'"


def test_a_server_that_dies_fails_with_its_output(tmp_path):
    text = f"<!-- doc-test: server {free_port()} -->\n```bash\necho cannot bind; exit 4\n```\n"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)the server exited \(4\).*cannot bind"):
        run_blocks(text, tmp_path)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
