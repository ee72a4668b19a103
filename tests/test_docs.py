"""Docs that run: every TOML and shell block of README.md and docs/*.md is checked.

Marker convention (the fenced block's info string, after the language):

* ```` ```toml runnable ```` / ```` ```bash runnable ````: checked here. A TOML block
  loads through the real config validator; a TOML block whose first line is
  ``# NAME.toml`` is the file NAME.toml that commands of any page may name. A shell
  block's commands must exist and parse their arguments: ``streamrec ...`` through the
  CLI's own argparse parser, ``python -m bytewax.run X`` by importing and building X the
  way Bytewax does (without running it), ``STREAMREC__*`` variables through the config
  loader, files named by ``--config``, ``-f``, ``python FILE`` and ``build('FILE')`` must
  be in the repo or a named TOML block.
* ```` ```bash runnable exec ````: also executed (in a temporary directory).
* ```` ```bash norun ```` / ```` ```toml norun ````: shown only (a fragment, a recipe
  that needs something a fresh clone lacks); say why in the text around it.

A TOML or shell block with neither marker fails the test, so new docs are checked too.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from flows.cli import parser as streamrec_parser
from flows.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
CHECKED = SHELL | {"toml"}
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
EXTERNAL = {"mkdir", "curl", "kill", "docker", "docker-compose", "cd"}
"""Programs outside the project that a runnable block may call (their arguments are not
parsed here; repo paths among them must exist)."""
OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    flags: frozenset[str]
    body: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang})"


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    """Every fenced block of the pages."""
    out = []
    for page in pages:
        text = page.read_text()
        for m in FENCE.finditer(text):
            words = m.group("info").split()
            if not words:
                continue
            line = text.count("\n", 0, m.start()) + 1
            out.append(Block(page, line, words[0], frozenset(words[1:]), m.group("body")))
    return out


ALL = blocks()
RUNNABLE = [b for b in ALL if b.lang in CHECKED and "runnable" in b.flags]


def named_files() -> dict[str, str]:
    """Named TOML blocks (first line ``# NAME.toml``) of every page: name -> text."""
    out = {}
    for b in ALL:
        first = b.body.splitlines()[0] if b.body else ""
        m = re.fullmatch(r"#\s*(\S+\.toml)\s*", first)
        if b.lang == "toml" and m:
            out[m.group(1)] = b.body
    return out


def commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped,
    split at ``&&``, ``||``, ``;``, ``|`` and ``&``."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in OPERATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(token)
        if current:
            out.append(current)
    return out


def _repo_file(name: str, files: dict[str, str]) -> None:
    if name in files or (ROOT / name).exists():
        return
    raise AssertionError(f"{name!r} is neither in the repo nor a named TOML block "
                         f"(known: {sorted(files)})")


def check_streamrec(args: list[str], files: dict[str, str]) -> None:
    try:
        ns = streamrec_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"streamrec {shlex.join(args)}: argparse rejected it") from exc
    if getattr(ns, "config", None):
        _repo_file(ns.config, files)


def check_bytewax_run(args: list[str], files: dict[str, str], tmp: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse like ``python -m bytewax.run`` and build the flow it names (not run it)."""
    import bytewax.run as bw

    monkeypatch.setattr(sys, "argv", ["bytewax.run", *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # _prepare_import prepends the cwd
    try:
        ns = bw._parse_args()
    except SystemExit as exc:
        raise AssertionError(f"python -m bytewax.run {shlex.join(args)}: rejected") from exc
    for name in re.findall(r"build\('([^']+)'\)", ns.import_str):
        _repo_file(name, files)
    # Named configs are written beside the repo's own folders, as a user's cwd would be.
    for name, text in files.items():
        (tmp / name).write_text(text)
    for entry in ("docker", "flows"):
        if not (tmp / entry).exists():
            (tmp / entry).symlink_to(ROOT / entry)
    monkeypatch.chdir(tmp)
    # A documented config that names a remote broker is built, not connected to.
    monkeypatch.setenv("STREAMREC__KAFKA__STARTUP_TIMEOUT_S", "0")
    thresholds = gc.get_threshold()
    try:
        mod, attr = bw._prepare_import(ns.import_str)
        bw._locate_dataflow(mod, attr)
    finally:
        gc.set_threshold(*thresholds)


def check_python(args: list[str], files: dict[str, str], tmp: Path,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module == "bytewax.run":
            check_bytewax_run(rest, files, tmp, monkeypatch)
        elif module == "flows.cli":
            check_streamrec(rest, files)
        else:
            assert importlib.util.find_spec(module) is not None, f"no module {module}"
        return
    script = args[0]
    assert script.endswith(".py"), f"python {shlex.join(args)}: expected a script or -m"
    _repo_file(script, files)
    compile((ROOT / script).read_text(), script, "exec")


def check_pip(args: list[str]) -> None:
    assert args[:1] == ["install"], f"pip {shlex.join(args)}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project.get("optional-dependencies", {}))
    for arg in args[1:]:
        m = re.fullmatch(r"\.(?:\[(.+)\])?", arg)
        if m and m.group(1):
            missing = set(m.group(1).split(",")) - extras
            assert not missing, f"pip install {arg}: no extra {missing} in pyproject.toml"


def check_command(argv: list[str], files: dict[str, str], tmp: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Check one simple command (see the module docstring)."""
    env = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    if any(k.upper().startswith("STREAMREC__") for k in env):
        load_config(None, environ=env)  # the override must name real keys with valid values
    assert argv, "an assignment without a command"
    program, args = argv[0], argv[1:]
    if program == "streamrec":
        check_streamrec(args, files)
    elif program in ("python", "python3"):
        check_python(args, files, tmp, monkeypatch)
    elif program == "pip":
        check_pip(args)
    elif program in EXTERNAL:
        for arg in args:
            if re.match(r"(docker|docs|flows|bench|tests)/", arg):
                _repo_file(arg, files)
    else:
        raise AssertionError(f"{program}: not a command a runnable block may use "
                             f"(streamrec, python, pip, {', '.join(sorted(EXTERNAL))})")


def test_every_toml_and_shell_block_is_marked() -> None:
    unmarked = [str(b) for b in ALL if b.lang in CHECKED and not b.flags & {"runnable", "norun"}]
    assert not unmarked, ("mark each block `runnable` (checked) or `norun` (shown only) "
                          f"after its language: {unmarked}")


def test_the_docs_have_runnable_blocks() -> None:
    """The checks below cannot pass vacuously: README and the docs carry checked blocks."""
    pages = {b.page.name for b in RUNNABLE}
    assert {"README.md", "operations.md", "evaluation.md"} <= pages
    assert sum(b.lang == "toml" for b in RUNNABLE) >= 4
    assert any("exec" in b.flags for b in RUNNABLE)


@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.lang == "toml"], ids=str)
def test_toml_block_loads_through_the_validator(block: Block) -> None:
    try:
        load_config(tomllib.loads(block.body), environ={})
    except (ConfigError, tomllib.TOMLDecodeError) as err:
        pytest.fail(f"{block}: {err}")


@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.lang in SHELL], ids=str)
def test_shell_block_commands_exist_and_parse(block: Block, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = named_files()
    cmds = commands(block.body)
    assert cmds, f"{block}: no command"
    for argv in cmds:
        try:
            check_command(list(argv), files, tmp_path, monkeypatch)
        except (AssertionError, ConfigError, ImportError, SyntaxError) as err:
            pytest.fail(f"{block}: {shlex.join(argv)}: {err}")


# -- the checker itself catches the defects it is for ---------------------------------


@pytest.mark.parametrize(("line", "message"), [
    ("streamrec run --config replay-missing.toml", "neither in the repo"),
    ("streamrec simulate --seed 7 -o x.jsonl", "argparse rejected"),
    ("streamrec tapp examples", "argparse rejected"),
    ("STREAMREC__SAMPLER__NEGATIVE_RATIO=0.1 streamrec config-reference", "unknown key"),
    ("python -m bytewax.run \"flows.recsys:build('nope.toml')\"", "neither in the repo"),
    ("python -m bytewax.run flows.recsys:nothing", "nothing"),
    ("python bench/nope.py", "neither in the repo"),
    ("pip install -e '.[nope]'", "no extra"),
    ("frobnicate --now", "not a command"),
])
def test_the_checker_rejects_broken_commands(line: str, message: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises((AssertionError, ConfigError, AttributeError), match=message):
        for argv in commands(line):
            check_command(list(argv), named_files(), tmp_path, monkeypatch)


def test_the_checker_rejects_the_old_readme_kafka_config() -> None:
    old = ('[kafka]\nbootstrap = "kafka-1:9092"\n'
           'client = { security_protocol = "SASL_SSL", sasl_mechanism = "PLAIN" }\n')
    with pytest.raises(ConfigError, match="kafka.client.security_protocol"):
        load_config(tomllib.loads(old), environ={})


def test_commands_split_like_a_shell() -> None:
    body = ('mkdir -p r && python -m bytewax.recovery r 1   # once\n'
            'python -m bytewax.run "flows.recsys:build(\'my.toml\')" \\\n    -r r -s 10 -b 60 &\n'
            'streamrec tap examples --filter "label == 1"\n')
    assert commands(body) == [
        ["mkdir", "-p", "r"], ["python", "-m", "bytewax.recovery", "r", "1"],
        ["python", "-m", "bytewax.run", "flows.recsys:build('my.toml')", "-r", "r", "-s", "10",
         "-b", "60"],
        ["streamrec", "tap", "examples", "--filter", "label == 1"],
    ]


# -- pages ------------------------------------------------------------------------------


def test_docs_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name}" in index, f"docs/README.md does not link {page.name}"


def test_no_references_to_files_outside_the_repo() -> None:
    """The docs, the code and the --help texts name only files a clone has."""
    texts = {p: p.read_text() for p in PAGES}
    for folder in ("flows", "operators", "models", "state", "bench", "tests"):
        texts.update({p: p.read_text() for p in (ROOT / folder).rglob("*.py")})
    pattern = re.compile(r"DESIGN(\.md| section)|\.\./shared/DESIGN")
    bad = [str(p.relative_to(ROOT)) for p, t in texts.items()
           if pattern.search(t) and p != Path(__file__).resolve()]
    assert not bad, f"references to a design file outside the repo: {bad}"
    helps = streamrec_parser().format_help()
    assert "DESIGN" not in helps
    for link in re.findall(r"\]\(([^)#\s]+)", "".join(t for p, t in texts.items() if p.suffix == ".md")):
        if "://" in link:
            continue
        pages_with = [p for p, t in texts.items() if f"]({link}" in t]
        assert any((p.parent / link).exists() for p in pages_with), f"broken link {link}"


# -- the quickstart really runs ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in RUNNABLE if "exec" in b.flags], ids=str)
def test_exec_blocks_run(block: Block, tmp_path: Path) -> None:
    """Blocks marked ``exec`` run as written (``streamrec`` as ``python -m flows.cli``;
    ``pip install`` lines are skipped: the test environment has the project installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    outputs = []
    for argv in commands(block.body):
        if argv[0] == "pip":
            continue
        assert argv[0] == "streamrec", f"{block}: exec blocks run streamrec commands only"
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv[1:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    # the last command shows the first result: recommendations with items, a JSON record a line
    last = [orjson.loads(line) for line in outputs[-1].splitlines() if line.strip()]
    assert last and all(rec["items"] and rec["items"][0]["item_id"] for rec in last), outputs[-1]


def test_streamrec_simulate_writes_the_stream_of_the_flows_simulator_input(tmp_path) -> None:
    """The quickstart's log paces event time as the zero-config flow does (a log 25x denser
    in event time got no item snapshot before it ended: every list was empty)."""
    from events.simulator import SimConfig, Simulator
    from flows.cli import main

    assert main(["simulate", "-n", "3000", "--seed", "7", "-o", str(tmp_path / "log.jsonl"),
                 "-q"]) == 0
    inp = load_config({"inputs": [{"kind": "simulator", "seed": 7}]}, environ={}).inputs[0]
    sim = Simulator(SimConfig(n_users=inp.n_users, n_items=inp.n_items,
                              requests_per_s=inp.requests_per_s), seed=7, max_events=3000)
    expected = [e for batch in iter(lambda: sim.next_batch(1000), []) for e in batch]
    written = [orjson.loads(line) for line in (tmp_path / "log.jsonl").read_bytes().splitlines()]
    assert written == orjson.loads(orjson.dumps(expected))

