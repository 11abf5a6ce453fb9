#!/usr/bin/env python3
"""Run the walk-throughs of the docs as written, from the docs themselves.

A walk-through is the shell blocks of README.md and docs/*.md marked with an
HTML comment (invisible on GitHub) just before the fence:

    <!-- ci NAME: OPTION; OPTION ... -->   (or <!-- ci NAME --> without options)
    ```sh
    ...
    ```

Options: `background` (a server: started and left running until the
walk-through ends), `ready HOST:PORT ...` (wait until each accepts
connections), `expect TEXT` (the block's output must hold TEXT),
`exit N` (the block exits N, not 0), `file PATH` (the block is a file to
write, not to run), `output` (the block is the output the previous block
must print, line for line). A comment without a block is a check:
`wait-log N TEXT` (the Nth background block's output comes to hold TEXT).

Blocks run in one bash session in a fresh directory, in document order, so
`export` and files carry over. The one liberty taken: commands that build
and run Skein's binaries use the debug binaries CI has already built —
`cargo run --release -p P --bin B --` runs target/debug/B, `cargo build
--release ...` does nothing, `target/release/` is target/debug/ — and
`docker-compose ... --build` does not build (CI cannot pull the Rust image;
the image is built from the host's binaries first).

Usage: walkthroughs.py NAME...   (from the repository root)
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = re.compile(r"^\s*<!-- ci ([\w-]+)(?::\s*(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```")


def docs():
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def steps(name):
    """(file, line, options, block or None) for walk-through NAME, in order."""
    out = []
    for path in docs():
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = MARK.match(lines[i])
            if not m or m.group(1) != name:
                i += 1
                continue
            opts = [o.strip() for o in (m.group(2) or "").split(";") if o.strip()]
            j = i + 1
            block = None
            f = FENCE.match(lines[j]) if j < len(lines) else None
            if f:
                indent = len(f.group(1))
                k = j + 1
                body = []
                while k < len(lines) and not FENCE.match(lines[k]):
                    body.append(lines[k][indent:] if lines[k][:indent].strip() == "" else lines[k])
                    k += 1
                block = "\n".join(body) + "\n"
                j = k + 1
            out.append((path.relative_to(REPO), i + 1, opts, block))
            i = j
    return out


def as_run_here(block):
    """The one liberty: Skein's binaries are CI's debug builds."""
    debug = str(REPO / "target" / "debug")
    block = re.sub(r"cargo run --release -p [\w-]+ --bin ([\w-]+)( --)?", debug + r"/\1", block)
    block = re.sub(r"cargo build --release[^\n]*", "true", block)
    block = block.replace("target/release/", debug + "/")
    # An installed skeind / skeinctl is the one just built.
    block = re.sub(r"(?m)^(skeind|skeinctl)\b", debug + r"/\1", block)
    block = re.sub(r"(docker-compose [^\n]*) --build", r"\1", block)
    return block


def script(name, work):
    lines = [
        "set -euo pipefail",
        "wait_port() { local until=$((SECONDS + 60)); "
        "until (exec 3<>/dev/tcp/${1%:*}/${1##*:}) 2>/dev/null; do "
        '[ $SECONDS -lt $until ] || { echo "nothing listens on $1"; return 1; }; sleep 0.2; done; }',
        "wait_log() { local until=$((SECONDS + 60)); "
        'until grep -qF -- "$2" "$1"; do [ $SECONDS -lt $until ] || '
        '{ echo "$1 never showed: $2"; tail -n 30 "$1"; return 1; }; sleep 0.2; done; }',
    ]
    n_bg = 0
    last_out = None
    (work / "env.sh").write_text("")
    found = steps(name)
    if not found:
        sys.exit(f"no walk-through named {name}")
    for k, (path, line, opts, block) in enumerate(found):
        where = f"{path}:{line}"
        words = {o.split()[0]: o[len(o.split()[0]):].strip() for o in opts}
        lines.append(f"echo '--- {where}'")
        if block is None:
            if "wait-log" in words:
                n, text = words["wait-log"].split(" ", 1)
                lines.append(f"wait_log {work}/bg{n}.log {shlex.quote(text)}")
            continue
        if "file" in words:
            lines.append(f"cat > {shlex.quote(words['file'])} <<'CI_FILE_END'\n{block}CI_FILE_END")
            continue
        if "output" in words:
            if last_out is None:
                sys.exit(f"{where}: an output block follows no command")
            (work / f"expected{k}.txt").write_text(block)
            lines.append(f"diff -u {work}/expected{k}.txt {last_out} || {{ echo '{where}: the output differs'; exit 1; }}")
            continue
        body = as_run_here(block)
        (work / f"step{k}.sh").write_text(body)
        if "background" in words:
            n_bg += 1
            lines.append(f"bash -c 'source {work}/env.sh; source {work}/step{k}.sh' > {work}/bg{n_bg}.log 2>&1 &")
        else:
            want = words.get("exit", "0")
            out = f"{work}/out{k}.txt"
            # A shell of its own, with what earlier blocks exported.
            run_it = f"set -e; source {work}/env.sh; source {work}/step{k}.sh; export -p > {work}/env.sh"
            lines.append(f"set +e; bash -c {shlex.quote(run_it)} > {out} 2>&1; rc=$?; set -e; cat {out}")
            lines.append(f"[ $rc -eq {want} ] || {{ echo '{where}: exit '$rc', wanted {want}'; exit 1; }}")
            if "expect" in words:
                lines.append(
                    f"grep -qF -- {shlex.quote(words['expect'])} {out} || "
                    f"{{ echo {shlex.quote(where + ': no ' + words['expect'])}; exit 1; }}"
                )
            last_out = out
        for addr in words.get("ready", "").split():
            lines.append(f"wait_port {addr}")
    return "\n".join(lines) + "\n"


def run(name):
    work = Path(tempfile.mkdtemp(prefix=f"walk-{name}-"))
    # The compose demo runs from the repository, as deploy.md says.
    cwd = REPO if name == "compose" else work
    (work / "walk.sh").write_text(script(name, work))
    print(f"== walk-through {name} (in {cwd})", flush=True)
    env = dict(os.environ, CI_WORK=str(work))
    for k in ("SKEIN_TOKEN", "SKEIN_NODE", "SKEIN_CA", "SKEIN_CONFIG"):
        env.pop(k, None)
    p = subprocess.Popen(["bash", str(work / "walk.sh")], cwd=cwd, env=env, start_new_session=True)
    try:
        rc = p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        rc = "timed out"
    # Whatever it started (servers, nodes) goes with it.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(3)
    if rc != 0:
        logs = sorted(work.glob("*.log")) if cwd == REPO else sorted(cwd.glob("*.log"))
        for log in logs:
            print(f"--- {log}", flush=True)
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), flush=True)
        sys.exit(f"walk-through {name} failed: {rc}")
    print(f"walk-through {name}: ok", flush=True)


if __name__ == "__main__":
    for n in sys.argv[1:]:
        run(n)
