"""Plugins (:mod:`kdbench.plugins`): discovery by entry points, clashes, where a method comes from, provenance,
``kdbench verify``'s version check, ``kdbench new-method`` and ``kdbench check-method``.

An installed plugin is faked by a ``<name>-<version>.dist-info`` directory (``METADATA`` and
``entry_points.txt``, what ``pip install`` writes) next to its module, on ``sys.path``: in this process
(``monkeypatch.syspath_prepend``; the :func:`registry` fixture restores the method registry) or in a fresh one
(``PYTHONPATH``), where the registry discovers it on first use as it does in every kdbench command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from kdbench import plugins
from kdbench.errors import ConfigError
from kdbench.methods import METHODS
from kdbench.methods.base import _register_plugin, method_source
from kdbench.plugins import METHOD_GROUP, PluginError, load_group
from kdbench.registry import Registry

REPO = Path(__file__).resolve().parents[1]
KDBENCH = [sys.executable, "-m", "kdbench.cli"]

METHOD_MODULE = '''\
"""A fake plugin method. Deviations from the paper: none. Search space: KD's."""
from kdbench.methods.kd import KD


class {cls}(KD):
    name = "{name}"
    search_space = KD.search_space
'''


def fake_dist(root: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]],
              modules: dict[str, str] = {}) -> Path:
    """Writes an installed distribution's metadata and its modules into ``root`` (a ``sys.path`` entry)."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in entry_points.items())
    )
    for module, text in modules.items():
        (root / f"{module}.py").write_text(text)
    return root


def method_dist(root: Path, name: str, dist: str = "fakeplug", version: str = "0.3", module: str = "fakeplug_mod",
                cls: str = "Method") -> Path:
    return fake_dist(root, dist, version, {METHOD_GROUP: {name: f"{module}:{cls}"}},
                     {module: METHOD_MODULE.format(cls=cls, name=name)})


@pytest.fixture
def registry():
    """Restores the method registry (and the loaded modules of fakes) after a test that loads plugins."""
    METHODS.names()  # the registry's own loading (of the environment's plugins) is done before the test
    items, sources = dict(METHODS._items), dict(METHODS._sources)
    modules = set(sys.modules)
    yield METHODS
    METHODS._items.clear()
    METHODS._items.update(items)
    METHODS._sources.clear()
    METHODS._sources.update(sources)
    for m in set(sys.modules) - modules:
        if m.startswith(("fakeplug", "other_mod", "kdbench_plugin_")):
            del sys.modules[m]


def run(args: list[str], *paths: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A fresh process with ``paths`` on its ``sys.path`` (as installed packages)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


# --- discovery --------------------------------------------------------------------------------------------


def test_a_registry_runs_its_loader_once_on_first_read_and_never_on_register():
    calls = []
    reg: Registry[int] = Registry("thing", loader=lambda: (calls.append(1), reg.register("late", "p")(2)))
    reg.register("early")(1)
    assert calls == []
    assert reg.names() == ["early", "late"] and calls == [1]
    assert reg.get("late") == 2 and "early" in reg and list(reg) == ["early", "late"] and calls == [1]
    assert reg.source("early") == "built-in" and reg.source("late") == "p"


def test_a_plugin_method_is_registered_with_its_package_and_version(tmp_path, monkeypatch, registry):
    monkeypatch.syspath_prepend(str(method_dist(tmp_path, "fake_kd")))
    loaded = load_group(METHOD_GROUP, _register_plugin)
    assert [p.package for p in loaded] == ["fakeplug"]
    cls = METHODS.get("fake_kd")
    assert cls.__module__ == "fakeplug_mod"
    source = method_source("fake_kd")
    assert (source.package, source.version) == ("fakeplug", "0.3")
    assert source.entry_point == "kdbench.methods: fake_kd = fakeplug_mod:Method"
    assert source.source_dir == tmp_path
    assert method_source("kd") is None

    from kdbench.cli import method_rows, render_methods

    rows = {r["name"]: r for r in method_rows()}
    assert rows["fake_kd"]["source"] == {"package": "fakeplug", "version": "0.3", "built_in": False,
                                         "entry_point": "kdbench.methods: fake_kd = fakeplug_mod:Method"}
    assert rows["kd"]["source"]["built_in"] is True
    text = render_methods([rows["fake_kd"], rows["kd"]])
    assert "source        fakeplug 0.3 (kdbench.methods: fake_kd = fakeplug_mod:Method)" in text
    assert "source        built-in" in text


def test_every_command_discovers_a_plugin_on_first_use_of_the_registry(tmp_path):
    """A fresh process, no explicit loading: ``kdbench methods`` lists the plugin with its source."""
    out = run([*KDBENCH, "methods", "--json"], method_dist(tmp_path, "fake_kd"))
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["fake_kd"]["source"]["package"] == "fakeplug"
    assert {"kd", "dkd", "baseline"} <= set(rows)


def test_a_plugin_named_like_a_built_in_is_refused_naming_both(tmp_path, monkeypatch, registry):
    monkeypatch.syspath_prepend(str(method_dist(tmp_path, "kd")))
    with pytest.raises(PluginError) as err:
        load_group(METHOD_GROUP, _register_plugin)
    msg = str(err.value)
    assert "package fakeplug 0.3" in msg and "kdbench.methods: kd = fakeplug_mod:Method" in msg
    assert "kdbench (built-in, kdbench.methods.kd)" in msg
    assert "rename the entry point" in msg
    assert METHODS.get("kd").__module__ == "kdbench.methods.kd"


def test_two_plugins_with_one_name_are_refused_naming_both_packages(tmp_path):
    a = method_dist(tmp_path / "a", "twin", dist="fakeplug", version="0.3")
    b = method_dist(tmp_path / "b", "twin", dist="other-plug", version="2.0", module="other_mod")
    out = run([*KDBENCH, "methods"], a, b)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdbench: error: "), out.stderr  # one line, no traceback
    assert "fakeplug 0.3" in lines[0] and "other-plug 2.0" in lines[0] and "'twin'" in lines[0]


def test_an_entry_point_whose_class_has_another_name_is_refused(tmp_path, monkeypatch, registry):
    root = fake_dist(tmp_path, "fakeplug", "0.3", {METHOD_GROUP: {"alias": "fakeplug_mod:Method"}},
                     {"fakeplug_mod": METHOD_MODULE.format(cls="Method", name="fake_kd")})
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(PluginError, match="is named 'fake_kd'; set name = 'alias'"):
        load_group(METHOD_GROUP, _register_plugin)


def test_an_entry_point_that_does_not_load_names_the_package(tmp_path, monkeypatch, registry):
    root = fake_dist(tmp_path, "fakeplug", "0.3", {METHOD_GROUP: {"gone": "fakeplug_missing:Method"}})
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(PluginError, match=r"package fakeplug 0.3: entry point .*gone.* does not load.*pip uninstall"):
        load_group(METHOD_GROUP, _register_plugin)


MODEL_MODULE = '''\
from kdbench.models import ConvNet


def net(pretrained=False, **kwargs):
    return ConvNet((4, 8, 16), (1, 1, 1), **kwargs)
'''


def test_a_plugin_model_is_a_timm_model_and_a_clash_with_a_built_in_is_refused(tmp_path):
    ok = fake_dist(tmp_path / "ok", "fakeplug-models", "1.2", {plugins.MODEL_GROUP: {"fake_net": "fakeplug_net:net"}},
                   {"fakeplug_net": MODEL_MODULE})
    code = ("from kdbench.models import create_model, check_model_name; from kdbench.plugins import model_source;"
            "m = create_model('fake_net', 10, 1, 28); print(type(m).__name__, check_model_name('fake_net'),"
            " model_source('fake_net').describe())")
    out = run([sys.executable, "-c", code], ok)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ConvNet", "None", "fakeplug-models", "1.2"]

    bad = fake_dist(tmp_path / "bad", "fakeplug-models", "1.2", {plugins.MODEL_GROUP: {"cnn_s": "fakeplug_net:net"}},
                    {"fakeplug_net": MODEL_MODULE})
    out = run([sys.executable, "-c", "from kdbench.models import check_model_name; check_model_name('cnn_xs')"], bad)
    assert out.returncode != 0
    assert "model 'cnn_s' of package fakeplug-models 1.2" in out.stderr
    assert "built-in kdbench (kdbench.models)" in out.stderr


# --- provenance, the leaderboard, verify --------------------------------------------------------------------


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_provenance_names_the_plugin_its_version_commit_and_dirty_files(tmp_path, monkeypatch, registry):
    from kdbench.runtime import plugin_provenance

    root = method_dist(tmp_path / "checkout", "fake_kd")
    _git(root, "init", "-q")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", "--allow-empty")
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "plugin")
    monkeypatch.syspath_prepend(str(root))
    load_group(METHOD_GROUP, _register_plugin)
    [entry] = plugin_provenance("fake_kd", ["cnn_m", "cnn_xs"])
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert entry == {"package": "fakeplug", "version": "0.3", "provides": ["method fake_kd"], "git_commit": head,
                     "dirty_files": []}
    (root / "fakeplug_mod.py").write_text((root / "fakeplug_mod.py").read_text() + "# edited\n")
    [entry] = plugin_provenance("fake_kd", [])
    assert entry["git_commit"] == head + "+dirty" and entry["dirty_files"] == ["fakeplug_mod.py"]
    assert plugin_provenance("kd", ["cnn_m"]) == []


def test_the_leaderboard_shows_the_plugin_and_flags_a_run_with_another_version():
    from kdbench.report.provenance import provenance_columns, summarize_provenance
    from kdbench.report.records import plugin_cell, runs_columns

    entry = {"package": "fakeplug", "version": "0.3", "git_commit": "abc+dirty", "dirty_files": ["b.py", "a.py"]}
    assert plugin_cell(entry) == "0.3 (git abc+dirty: a.py; b.py)"
    assert plugin_cell({"package": "fakeplug", "version": "0.3"}) == "0.3"
    rows = [{"record": f"r{i}", "method": "fake_kd", "seed": i, "plugin.fakeplug": v}
            for i, v in enumerate(["0.3", "0.3", "0.4"])]
    rows.append({"record": "r9", "method": "kd", "seed": 0, "plugin.fakeplug": None})  # a built-in: not compared
    columns = runs_columns(rows)
    assert "plugin.fakeplug" in provenance_columns(columns)
    fields, flagged = summarize_provenance(rows, columns)
    assert flagged == {"r2": ["plugin.fakeplug"]}
    [field] = [f for f in fields if f.column == "plugin.fakeplug"]
    assert field.values == [("0.3", 2), ("0.4", 1)]


def test_flatten_record_has_one_plugin_column_per_package():
    from kdbench.report.records import flatten_record

    rec = {"status": "skipped", "protocol_hash": "h",
           "identity": {"config": "c", "dataset": "d", "teacher": "t", "teacher_model": "cnn_m", "student": "s",
                        "method": "fake_kd", "method_name": "fake_kd", "params": {}, "seed": 0},
           "provenance": {"plugins": [{"package": "fakeplug", "version": "0.3", "provides": ["method fake_kd"]}]}}
    row = flatten_record(rec, Path("r/record.json"))
    assert row["plugin.fakeplug"] == "0.3" and "prov.plugins" not in row


@pytest.mark.parametrize("package, recorded, says", [
    ("numpy", "0.0.1", "plugin numpy 0.0.1 made it, but numpy {installed} is installed (pip install 'numpy==0.0.1')"),
    ("kdbench-plugin-never-installed", "1.0", "kdbench-plugin-never-installed is not installed"),
])
def test_verify_refuses_a_record_whose_plugin_version_is_not_installed(tmp_path, package, recorded, says):
    import importlib.metadata

    from kdbench.verify import plugin_mismatches, verify

    record = {"status": "ok", "provenance": {"plugins": [{"package": package, "version": recorded}]}}
    (tmp_path / "record.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as err:
        verify(tmp_path)
    installed = importlib.metadata.version("numpy")
    assert says.format(installed=installed) in str(err.value)
    assert str(tmp_path / "record.json") in str(err.value)
    same = {"provenance": {"plugins": [{"package": "numpy", "version": installed}]}}
    assert plugin_mismatches(same) == [] and plugin_mismatches({"provenance": {}}) == []


# --- new-method and check-method ----------------------------------------------------------------------------


def installed(plugin_dir: Path, site: Path) -> Path:
    """What ``pip install -e plugin_dir`` leaves on ``sys.path``: the dist-info of its pyproject (name, version,
    entry points); the plugin directory itself goes on the path too."""
    project = tomllib.loads((plugin_dir / "pyproject.toml").read_text())["project"]
    return fake_dist(site, project["name"], project["version"], project["entry-points"])


def test_new_method_writes_a_plugin_that_passes_check_method_and_its_own_tests(tmp_path):
    out = run([*KDBENCH, "new-method", "my_kd", "--out", str(tmp_path / "plugin")])
    assert out.returncode == 0, out.stderr
    plugin = tmp_path / "plugin"
    files = sorted(str(p.relative_to(plugin)) for p in plugin.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "kdbench_plugin_my_kd/__init__.py", "kdbench_plugin_my_kd/my_kd.py",
                     "pyproject.toml", "tests/test_my_kd.py"]
    project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
    assert project["name"] == "kdbench-plugin-my-kd"
    assert project["entry-points"]["kdbench.methods"] == {"my_kd": "kdbench_plugin_my_kd.my_kd:MyKd"}
    method = (plugin / "kdbench_plugin_my_kd" / "my_kd.py").read_text()
    assert "Deviations from the paper" in method and "search_space = " in method and "${" not in method

    site = installed(plugin, tmp_path / "site")
    check = run([*KDBENCH, "check-method", "my_kd"], site, plugin)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "method 'my_kd' passes the contract" in check.stdout and " 0 failed" in check.stdout
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], site, plugin, cwd=plugin)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_check_method_says_in_words_what_a_broken_method_fails(tmp_path):
    root = method_dist(tmp_path, "fake_kd")
    (root / "fakeplug_mod.py").write_text((root / "fakeplug_mod.py").read_text() + textwrap.dedent('''
        from dataclasses import dataclass

        @dataclass
        class Unfrozen:
            tau: float = 4.0
            ce_weight: float = 0.1
            kd_weight: float = 0.9

        Method.Config = Unfrozen
        '''))
    out = run([*KDBENCH, "check-method", "fake_kd"], root)
    assert out.returncode == 1
    assert "FAIL default_config_and_declarations-fake_kd" in out.stdout
    assert "what is wrong: fake_kd: Config must be a frozen dataclass" in out.stdout
    assert "method 'fake_kd' breaks the contract" in out.stdout


def test_check_method_of_an_unknown_name_says_how_to_register_it():
    out = run([*KDBENCH, "check-method", "no_such_method"])
    assert out.returncode == 2
    assert "unknown method 'no_such_method'" in out.stderr and "pip install -e" in out.stderr


@pytest.mark.parametrize("name, says", [("kd", "exists already (built-in)"), ("My-KD", "lowercase Python identifier"),
                                        ("class", "lowercase Python identifier")])
def test_new_method_refuses_a_taken_or_bad_name(tmp_path, name, says):
    out = run([*KDBENCH, "new-method", name, "--out", str(tmp_path / "p")])
    assert out.returncode == 2 and says in out.stderr
    assert not (tmp_path / "p").exists()


def test_new_method_refuses_a_directory_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    out = run([*KDBENCH, "new-method", "my_kd", "--out", str(tmp_path)])
    assert out.returncode == 2 and "is not an empty directory" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
