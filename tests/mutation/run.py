"""Mutation testing of kdbench's core modules with mutmut, one module at a time against its own fast tests.

    python tests/mutation/run.py                       # every core module (long: see the README's scores)
    python tests/mutation/run.py stats compare         # some modules (a short name or the file's path)
    python tests/mutation/run.py --changed-since origin/main --max-mutants 60 --seed 0   # what CI runs

The core modules and the fast test files that cover each are in ``[tool.kdbench.mutation]`` of
pyproject.toml. For each module this writes a work directory ``.mutation/<module>/`` (links to ``kdbench/``
and ``tests/`` and a pyproject.toml whose ``[tool.mutmut]`` mutates that module only and selects its tests),
runs ``mutmut run`` there (mutmut copies the code into ``.mutation/<module>/mutants/`` and the tests import the
mutated copy; each mutant runs only the selected tests that call the mutated function), and reads the
verdicts. A surviving mutant fails the run unless ``tests/mutation/equivalent.toml`` lists it (module,
function, the line it removes, the line it adds) with the reason it cannot change behaviour, or it is a
*device-only* mutant (it drops a ``device=`` argument or sets it to ``None``, or sets a device passed
positionally to ``None`` or drops it as the last argument, and changes nothing else): on the
CPU, where the tests run, the tensor is made on the CPU either way, and on a GPU the mutant stops with a device
mismatch instead of corrupting a number, so no CPU test can tell it apart; these are counted with the listed ones
and shown as such. Results are
cached per function by mutmut; a cached survivor is always run again (a new test may kill it).

Exit status: 0 when every mutant is killed or listed, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".mutation"
EQUIVALENT = Path(__file__).with_name("equivalent.toml")

# mutmut's verdicts (exit code of the mutant's test run); a timeout counts as killed, as in mutmut's own score.
KILLED = {1, 3, 36, -24, 24, 152, 255}
NO_TESTS = {5, 33}


@dataclass
class Outcome:
    module: str
    total: int
    killed: int
    survivors: list[tuple[str, str, str, str]]  # (mutant name, function, removed line, added line)
    unlisted: list[tuple[str, str, str, str]]
    seconds: float


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Module:
    """A core module: its file, the test files that cover it, and the functions mutated (globs; all by default)."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ("*",)
    clean: bool = False  # every survivor killed or listed: what CI samples when a change touches no core module

    def mutates(self, function: str) -> bool:
        return any(fnmatch.fnmatchcase(function, p) for p in self.functions)


def core_modules() -> dict[str, Module]:
    """The core modules by file path, from ``[tool.kdbench.mutation.modules]`` in pyproject.toml: a list of test
    files, or a table ``{tests = [...], functions = [...]}``."""
    out = {}
    for path, entry in _project()["tool"]["kdbench"]["mutation"]["modules"].items():
        if isinstance(entry, list):
            entry = {"tests": entry}
        out[path] = Module(path, tuple(entry["tests"]), tuple(entry.get("functions", ["*"])), entry.get("clean", False))
    return out


def function_of(name: str) -> str:
    """``summarize`` or ``Plan.data_key`` for a mutant ``kdbench.report.stats.x_summarize__mutmut_3``."""
    local = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[1]
    return local.removeprefix("x_") if local.startswith("x_") else local.removeprefix("xǁ").replace("ǁ", ".")


def resolve(names: list[str], modules: dict[str, Module]) -> list[str]:
    """Module paths for short names (``stats``, ``cache/store``, ``kdbench/plan.py``)."""
    out = []
    for name in names:
        hits = [m for m in modules if m == name or m.removesuffix(".py").endswith("/" + name.removesuffix(".py"))]
        if len(hits) != 1:
            raise SystemExit(f"mutation: {name!r} names {len(hits)} core modules of {sorted(modules)}")
        out.append(hits[0])
    return out


def slug(module: str) -> str:
    return module.removeprefix("kdbench/").removesuffix(".py").replace("/", ".")


def dotted(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def prepare(module: str, tests: list[str], fresh: bool) -> Path:
    """The module's work directory: links to the code and tests, and mutmut's configuration for it."""
    work = WORK / slug(module)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("kdbench", "tests"):
        link = work / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    # The tests read files beside the package (results/published, workflow/, configs): mutmut's copy of the
    # project (mutants/) gets links to them.
    (work / "mutants").mkdir(exist_ok=True)
    for entry in ROOT.iterdir():
        link = work / "mutants" / entry.name
        if entry.name not in {"kdbench", "tests", "pyproject.toml", ".mutation", "mutants", ".git"} \
                and not link.is_symlink() and not link.exists():
            link.symlink_to(entry)
    project = _project()
    mutmut = dict(project["tool"].get("mutmut", {}))
    mutmut.update(only_mutate=[module], pytest_add_cli_args_test_selection=list(tests))
    pytest_ini = dict(project["tool"]["pytest"]["ini_options"])
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n" + _toml_table(mutmut) + "\n[tool.pytest.ini_options]\n" + _toml_table(pytest_ini)
    )
    return work


def _toml_table(table: dict) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Subprocesses the tests start (the kdbench CLI) import the mutated copy too, not the editable install.
    env["PYTHONPATH"] = str(work / "mutants")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _internal(work: Path, command: str, args: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, __file__, "--internal", command, *args],
        cwd=work, env=_env(work), capture_output=True, text=True,
    )
    if result.returncode:
        raise SystemExit(f"mutation: {command} failed in {work}:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]  # mutmut prints progress before the JSON line


def _mutmut(work: Path, names: list[str], max_children: int, log) -> None:
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe) if exe.exists() else "mutmut", "run", f"--max-children={max_children}", *names]
    result = subprocess.run(cmd, cwd=work, env=_env(work), stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"mutation: mutmut failed in {work} (exit {result.returncode}); see {log.name}")


def verdicts(work: Path, module: str) -> dict[str, int | None]:
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    return meta["exit_code_by_key"]


def equivalents() -> list[dict]:
    if not EQUIVALENT.exists():
        return []
    entries = tomllib.loads(EQUIVALENT.read_text()).get("mutant", [])
    for entry in entries:
        missing = {"module", "function", "removed", "added", "reason"} - set(entry)
        if missing or not entry["reason"].strip():
            raise SystemExit(f"mutation: {EQUIVALENT.name}: entry {entry} needs {sorted(missing) or ['a reason']}")
    return entries


def _without_device(line: str) -> str:
    """``line`` with its ``device=...`` arguments (a name or attribute, or ``None``) and white space taken out."""
    line = re.sub(r"\s+", "", re.sub(r"\bdevice\s*=\s*[\w.]+", "", line))
    return re.sub(r",+(?=\))", "", re.sub(r"\(,+", "(", re.sub(r",{2,}", ",", line)))


# A device passed positionally (``x.to(device)``, ``render(v, rows, size, self.device)``), white space removed.
_POSITIONAL_DEVICE = re.compile(r"(?<=[(,])(?:\w+\.)*device(?=[,)])")


def _squeezed(line: str) -> str:
    return re.sub(r",\)", ")", re.sub(r"\s+", "", line))


def device_only(removed: str, added: str) -> bool:
    """The mutant only drops a ``device=`` argument or sets it to ``None``, or sets a device passed positionally
    to ``None`` or drops it when it is the last argument (see the module docstring)."""
    if removed == added or "device" not in removed:
        return False
    if _without_device(removed) == _without_device(added) and (
            "device=None" in added.replace(" ", "") or added.count("device") < removed.count("device")):
        return True
    line, target = re.sub(r"\s+", "", removed), _squeezed(added)
    for m in _POSITIONAL_DEVICE.finditer(line):
        before, after = line[:m.start()], line[m.end():]
        # Dropped: only a last argument leaves a line a mutant can equal ("f(a,)"); one before another leaves
        # ",," or "(," where the mutant, whose later arguments shift into its place, has one comma.
        if target in (_squeezed(before + "None" + after), _squeezed(before + after)):
            return True
    return False


def _listed(module: str, survivor: tuple[str, str, str, str], listed: list[dict]) -> bool:
    _, function, removed, added = survivor
    if device_only(removed, added):
        return True
    return any(
        e["module"] == module and e["function"] == function and e["removed"] == removed and e["added"] == added
        for e in listed
    )


def run_module(module: Module, args, listed: list[dict], budget: int | None) -> Outcome:
    start = time.monotonic()
    work = prepare(module.path, list(module.tests), args.fresh)
    names = json.loads(_internal(work, "generate", []))
    candidates = [n for n in names if module.mutates(function_of(n))
                  and not any(fnmatch.fnmatch(n, p) for p in args.skip)]
    chosen = candidates
    if budget is not None and len(candidates) > budget:
        chosen = sorted(random.Random(f"{args.seed}:{module.path}").sample(candidates, budget))
    log_path = work / "mutmut.log"
    with open(log_path, "w") as log:
        if len(chosen) < len(names):  # named mutants: mutmut runs exactly these (again)
            _mutmut(work, chosen, args.max_children, log)
        else:  # every mutant: mutmut runs those without a cached verdict
            _mutmut(work, [], args.max_children, log)
            cached_survivors = [n for n, code in verdicts(work, module.path).items() if code not in KILLED]
            if cached_survivors:  # a test added since may kill them: run them again
                _mutmut(work, cached_survivors, args.max_children, log)
    codes = verdicts(work, module.path)
    killed = sum(codes[n] in KILLED for n in chosen)
    not_killed = [n for n in chosen if codes[n] not in KILLED]
    survivors = json.loads(_internal(work, "diff", [module.path, *not_killed])) if not_killed else []
    survivors = [tuple(s) for s in survivors]
    unlisted = [s for s in survivors if not _listed(module.path, s, listed)]
    for name in not_killed:
        if codes[name] != 0:
            status = "no selected test calls it" if codes[name] in NO_TESTS else f"exit code {codes[name]}"
            print(f"  note: {name}: {status}")
    return Outcome(module.path, len(chosen), killed, survivors, unlisted, time.monotonic() - start)


def changed_modules(base: str, modules: dict[str, Module]) -> list[str] | None:
    """Core modules whose file differs from ``base`` (``None`` when git cannot tell)."""
    try:
        out = subprocess.run(
            ["git", "diff", "--name-only", f"{base}...HEAD", "--", "kdbench"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = set(out.split())
    return [m for m in modules if m in changed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="core modules (default: all, or the changed ones)")
    parser.add_argument("--changed-since", metavar="REF", help="only the core modules changed since REF")
    parser.add_argument("--max-mutants", type=int, help="at most this many mutants in all (a seeded sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--sample-modules", type=int, default=2,
                        help="with --changed-since and no (or too many) changed modules: how many to sample")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--fresh", action="store_true", help="forget mutmut's cached verdicts")
    parser.add_argument("--skip", action="append", default=[], help="mutant name glob to leave out")
    parser.add_argument("--json", metavar="PATH", help="write the per-module scores here")
    args = parser.parse_args(argv)

    modules = core_modules()
    selected = resolve(args.modules, modules) if args.modules else list(modules)
    if args.changed_since and not args.modules:
        changed = changed_modules(args.changed_since, modules)
        if changed is None:
            print(f"mutation: git cannot diff against {args.changed_since}; sampling core modules")
        unmeasured = [m for m in changed or [] if not modules[m].clean]
        if unmeasured:  # gated once their survivors are killed or listed (README, "Mutation testing")
            print(f"mutation: not gated yet (no clean score): {', '.join(unmeasured)}")
            changed = [m for m in changed if modules[m].clean]
        if not changed or len(changed) > args.sample_modules:
            pool = changed or [m for m in modules if modules[m].clean]  # changed: clean ones only, here
            changed = sorted(random.Random(args.seed).sample(pool, min(args.sample_modules, len(pool))))
            print(f"mutation: a seeded sample (seed {args.seed}) of the core modules: {', '.join(changed)}")
        selected = changed
    listed = equivalents()
    budget = None if args.max_mutants is None else max(1, args.max_mutants // len(selected))

    outcomes = []
    for module in selected:
        print(f"mutation: {module} against {', '.join(modules[module].tests)}", flush=True)
        outcome = run_module(modules[module], args, listed, budget)
        outcomes.append(outcome)
        for name, function, removed, added in outcome.survivors:
            tag = ("SURVIVED" if (name, function, removed, added) in outcome.unlisted
                   else "device-only" if device_only(removed, added) else "equivalent (listed)")
            print(f"  {tag}: {name}\n      - {removed}\n      + {added}")
        print(f"  {outcome.killed}/{outcome.total} killed ({100 * outcome.killed / max(1, outcome.total):.1f}%), "
              f"{len(outcome.survivors) - len(outcome.unlisted)} listed as equivalent, "
              f"{len(outcome.unlisted)} unlisted survivors, {outcome.seconds:.0f} s", flush=True)

    print("\nmodule                          killed/total   score   listed  unlisted")
    for o in outcomes:
        print(f"{o.module:32s}{o.killed:6d}/{o.total:<6d}{100 * o.killed / max(1, o.total):7.1f}%"
              f"{len(o.survivors) - len(o.unlisted):8d}{len(o.unlisted):10d}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {o.module: {"killed": o.killed, "total": o.total, "listed": len(o.survivors) - len(o.unlisted),
                        "unlisted": [s[0] for s in o.unlisted]} for o in outcomes}, indent=2))
    bad = sum(len(o.unlisted) for o in outcomes)
    if bad:
        print(f"\nmutation: {bad} surviving mutant(s) not listed in {EQUIVALENT.relative_to(ROOT)}: kill them with "
              "a test, or list them there with the reason they cannot change behaviour")
    return 1 if bad else 0


# --- run inside a module's work directory, with mutmut's own machinery -----------------------------------------


def _internal_main(command: str, args: list[str]) -> None:
    import mutmut.__main__ as mm
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.mutation.data import SourceFileMutationData

    if command == "generate":  # mutmut's own generation step, to learn the mutants' names before a run
        Path("mutants").mkdir(exist_ok=True)
        mm.copy_src_dir()
        mm.copy_also_copy_files()
        mm.create_mutants(1)
        names = []
        for path in mm.walk_mutatable_files():
            data = SourceFileMutationData(path=path)
            data.load()
            names += list(data.exit_code_by_key)
        print(json.dumps(sorted(names)))
    elif command == "diff":  # (name, function, removed line, added line) of each mutant
        module, *names = args
        out = []
        for name in names:
            diff = get_diff_for_mutant(name, path=module)
            lines = diff.splitlines()
            removed = "\n".join(l[1:].strip() for l in lines if l.startswith("-") and not l.startswith("---"))
            added = "\n".join(l[1:].strip() for l in lines if l.startswith("+") and not l.startswith("+++"))
            out.append((name, function_of(name), removed, added))
        print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--internal":
        _internal_main(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
