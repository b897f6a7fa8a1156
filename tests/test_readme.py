"""README.md and docs/*.md stay runnable and linked (docs/testing.md, "The README test").

* README.md stays at or below 12 KB.
* Every ```python block of README.md runs, in order, in one namespace, on CPU under backends `torch` and
  `cpu` (on a GPU under `torch` and `auto`, with FASTCONV_AUTOTUNE=0); the docs' Python blocks run once per
  page under `torch` (`auto` on a GPU).
* Every command of README.md's ```bash blocks runs where this machine allows it, in README order, in a
  scratch folder: `python -m fastconv.train --data synthetic ...` as a tiny run (a few steps, tiny data),
  on CPU, `python -m fastconv.predict` / `feature_maps` on that checkpoint (missing image files are generated),
  `python -m fastconv.info`. The rest is checked without running: scripts with `bash -n`, pytest paths and
  plugins, every other `python -m` / `torchrun` command by its CLI's own argument parser (flags, choices,
  types). The docs' ```bash blocks are checked the same way, none of them run. A command this test does
  not know how to check fails it.
* Every relative link of README.md and docs/*.md resolves: the file or folder exists, and an `#anchor`
  names a heading of the target page (GitHub's heading slugs).

CLIs run in-process (their `main(argv)`), not as subprocesses: a subprocess pays torch's import each time.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch

import fastconv

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README] + DOCS
README_LIMIT = 12 * 1024
GPU = torch.cuda.is_available()

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
# `python -m MODULE` -> the module whose main(argv) is that command (`python -m fastconv` is the info command)
MAIN_MODULE = {"fastconv": "fastconv.info"}
# Commands this machine runs for real (README only); the tiny arguments appended to a training run.
RUNS = ("fastconv.info", "fastconv.train", "fastconv.predict", "fastconv.feature_maps")
TINY_TRAIN = ["--max-steps", "2", "--synthetic-train", "64", "--synthetic-test", "32", "--batch-size", "16",
              "--workers", "0", "--no-progress", "--device", "cpu"]
IMAGE = re.compile(r"\.(jpe?g|png)$", re.I)
OPTIONS_WITH_VALUE = {"-k", "-m", "-n", "-p", "-c", "--durations"}


def blocks(path: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def commands(path: Path) -> list[list[str]]:
    """The commands of a page's bash blocks as argument lists (comments and line continuations handled)."""
    out = []
    for body in blocks(path, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                out.append(tokens)
    return out


def _split_env(tokens: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        key, value = tokens[0].split("=", 1)
        env[key] = value
        tokens = tokens[1:]
    return env, tokens


def classify(tokens: list[str]) -> tuple[str, object]:
    """('bash', script) | ('pytest', args) | ('python', (module, argv)); fails on a command it cannot check."""
    _, tokens = _split_env(tokens)
    head = tokens[0]
    if head == "bash" and len(tokens) >= 2:
        return "bash", tokens[1]
    if head == "pytest":
        return "pytest", tokens[1:]
    if head == "torchrun" and "-m" in tokens:
        i = tokens.index("-m")
        return "python", (tokens[i + 1], tokens[i + 2:])
    if Path(head).name.startswith("python") and tokens[1:2] == ["-m"] and len(tokens) >= 3:
        if tokens[2] == "pytest":
            return "pytest", tokens[3:]
        return "python", (tokens[2], tokens[3:])
    pytest.fail(f"tests/test_readme.py does not know how to check the command {' '.join(tokens)!r}; teach it")


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _parse_only():
    """Inside, ArgumentParser.parse_args parses (errors exit as usual) and then raises _Parsed: a CLI's
    main(argv) stops right after its arguments were accepted."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        yield


def _main(module: str):
    return importlib.import_module(MAIN_MODULE.get(module, module)).main


def _call(module: str, argv: list[str]):
    main = _main(module)
    if MAIN_MODULE.get(module, module) == "fastconv.info":
        assert not argv, f"python -m {module} takes no arguments"
        return main()
    return main(argv)


def check_parses(module: str, argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), _parse_only():
        try:
            _call(module, argv)
        except _Parsed:
            return
        except SystemExit as e:
            pytest.fail(f"python -m {module} {shlex.join(argv)}: the CLI refused its arguments (exit {e.code}):\n"
                        f"{err.getvalue()}")
    if MAIN_MODULE.get(module, module) != "fastconv.info":
        pytest.fail(f"python -m {module}: main() returned without parsing arguments with argparse")


def check_static(kind: str, what) -> None:
    """The checks of a command that is not run."""
    if kind == "bash":
        script = ROOT / what
        assert script.is_file(), f"bash {what}: no such script"
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {what}: {proc.stderr}"
    elif kind == "pytest":
        skip_next = False
        for arg in what:
            if skip_next:
                skip_next = False
                continue
            if arg in OPTIONS_WITH_VALUE:
                skip_next = True
                if arg == "-n":
                    pytest.importorskip("xdist", reason="pytest -n needs pytest-xdist (the dev extra)")
                continue
            if arg.startswith("-"):
                continue
            path = arg.split("::")[0]
            if "/" in path or path.endswith(".py") or path in ("tests", "bench"):
                assert (ROOT / path).exists(), f"pytest {' '.join(what)}: {path} does not exist"
        if "--benchmark" in what:
            assert "--benchmark" in (ROOT / "bench" / "conftest.py").read_text()
    else:
        check_parses(*what)


def _image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=g)
    Image.fromarray(pixels.numpy()).save(path)


def test_readme_size():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it at or below {README_LIMIT} (move detail to docs/)"


@pytest.fixture
def gpu_quiet(monkeypatch):
    """On a GPU: heuristic tiles, no autotuning delay."""
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")


PY_BACKENDS = ["torch", "auto"] if GPU else ["torch", "cpu"]


@pytest.mark.parametrize("backend", PY_BACKENDS)
def test_readme_python_blocks_run(backend, gpu_quiet, tmp_path, monkeypatch):
    if backend == "cpu":
        from fastconv import _ext

        if not _ext.load():
            pytest.skip(f"backend 'cpu' needs the C++ extension: {_ext.reason()}")
    code = blocks(README, "python")
    assert len(code) >= 2, "README.md lost its Python examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    with fastconv.backend(backend), contextlib.redirect_stdout(io.StringIO()):
        for i, block in enumerate(code):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)


@pytest.mark.parametrize("page", [p for p in DOCS if blocks(p, "python")], ids=lambda p: p.name)
def test_docs_python_blocks_run(page, gpu_quiet, tmp_path, monkeypatch):
    code = blocks(page, "python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    with fastconv.backend("auto" if GPU else "torch"), contextlib.redirect_stdout(io.StringIO()):
        for i, block in enumerate(code):
            exec(compile(block, f"docs/{page.name} python block {i + 1}", "exec"), namespace)


def test_readme_commands(gpu_quiet, tmp_path, monkeypatch):
    cmds = commands(README)
    assert any(c[-1].endswith("setup.sh") for c in cmds), "README.md lost its set-up command"
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    ran = []
    for tokens in cmds:
        kind, what = classify(tokens)
        if kind == "python" and what[0] in RUNS:
            module, argv = what
            check_parses(module, argv)
            if module == "fastconv.train":
                if "synthetic" not in argv or "--profile" in argv:
                    continue  # needs downloads or only profiles: its arguments were checked
                argv = argv + TINY_TRAIN + ["--data-dir", str(data_dir)]
            for arg in argv:
                if IMAGE.search(arg) and not Path(arg).exists():
                    _image(Path(arg))
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                _call(module, argv)
            ran.append(module)
        else:
            check_static(kind, what)
    assert "fastconv.train" in ran, "README.md should show a training command that runs offline (--data synthetic)"


@pytest.mark.parametrize("page", [p for p in DOCS if blocks(p, "bash")], ids=lambda p: p.name)
def test_docs_commands_parse(page):
    for tokens in commands(page):
        check_static(*classify(tokens))


# ---------------------------------------------------------------------------------------------------------
# links


def _strip_code(text: str) -> str:
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^(#{1,6})\s+(.+?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(_strip_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                broken.append(f"{target}: an anchor into something that is not a Markdown page")
            elif anchor not in anchors(dest):
                broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)} "
                              f"(anchors: {', '.join(sorted(anchors(dest)))})")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_slugs_like_github():
    assert slug("The C++/CUDA extension") == "the-ccuda-extension"
    assert slug("Training CLI: `python -m fastconv.train`") == "training-cli-python--m-fastconvtrain"
    assert slug("Troubleshooting and running on a GPU") == "troubleshooting-and-running-on-a-gpu"
