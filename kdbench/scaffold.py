"""``kdbench new-method NAME --out DIR``: a new method as a plugin package, from the template in the package.

The template (``kdbench/templates/plugin/*.tmpl``) is the method contract written out: a method file with the
citation, the "Deviations from the paper" paragraph and the "Search space:" line, the pure loss, a frozen
``Config`` whose defaults are the paper's and its ``search_space``, then the class; a ``pyproject.toml`` whose
``kdbench.methods`` entry point registers it (:mod:`kdbench.plugins`); a golden test of the loss that also runs
the contract checks (:mod:`kdbench.contract`). ``pip install -e DIR`` makes the method a method of every kdbench
command.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from kdbench.errors import ConfigError

TEMPLATES = Path(__file__).parent / "templates" / "plugin"

#: Template file -> path in the plugin, both with ``${...}`` placeholders.
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "gitignore.tmpl": ".gitignore",
    "__init__.py.tmpl": "${module}/__init__.py",
    "method.py.tmpl": "${module}/${name}.py",
    "test_method.py.tmpl": "tests/test_${name}.py",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def names(name: str) -> dict[str, str]:
    """The template's placeholders for method ``name``: ``name``, ``class_name`` (CamelCase), ``module`` (the
    Python package) and ``package`` (the distribution).

    Raises:
        ConfigError: ``name`` is not a lowercase Python identifier.
    """
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise ConfigError(f"new-method: {name!r} is not a method name; use a lowercase Python identifier"
                          " (letters, digits, underscores; e.g. nkd or my_kd)")
    class_name = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)
    return {"name": name, "class_name": class_name, "module": f"kdbench_plugin_{name}",
            "package": f"kdbench-plugin-{name.replace('_', '-')}"}


def new_method(name: str, out: Path, taken: dict[str, str] | None = None) -> list[Path]:
    """Writes the plugin package of a new method ``name`` into ``out``.

    Args:
        name: The method's name (the entry point's and the class's).
        out: The plugin's directory; it must not exist or be empty.
        taken: Registered names and where they come from; a taken name is refused with its source.

    Returns:
        The files written, in template order.

    Raises:
        ConfigError: a bad or taken name, or ``out`` holds files already.
    """
    values = names(name)
    if taken and name in taken:
        raise ConfigError(f"new-method: the method {name!r} exists already ({taken[name]}); choose another name")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"new-method: --out {out} exists and is not an empty directory; name a new directory")
    written = []
    for template, target in FILES.items():
        path = out / Template(target).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template((TEMPLATES / template).read_text()).substitute(values))
        written.append(path)
    return written
