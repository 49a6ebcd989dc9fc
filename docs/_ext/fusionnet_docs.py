"""Sphinx directives that generate fusionnet's references from the code itself, so no page lists a name by hand.

* ``fusionnet-api``: every name in ``fusionnet.__all__``, documented by autodoc from its docstring and signature
  (classes with their public methods). A public name without a docstring fails the build.
* ``fusionnet-settings``: every field of every settings dataclass (``fusionnet.config``), with its type, default,
  command-line flag and help text, read from the dataclass fields and their ``setting()`` metadata.

The command-line reference is sphinx-argparse's ``argparse`` directive over ``fusionnet.cli.main.build_parser``.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# The settings reference, in the order a reader meets them; every dataclass in fusionnet.config must be listed
# (the directive refuses one that is missing, so a new settings class cannot go undocumented).
SETTINGS = ("TrainRun", "TrainConfig", "CompareConfig", "FuseConfig", "AutoConfig", "DistillConfig",
            "PlainConfig", "Reading")


class GeneratedRst(SphinxDirective):
    """A directive whose content is reStructuredText that :meth:`lines` generates (parsed with titles)."""

    has_content = False

    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        holder = nodes.Element()
        nested_parse_with_titles(self.state, StringList(self.lines(), source=self.get_source_info()[0]), holder)
        return list(holder.children)


class ApiReference(GeneratedRst):
    """Every public name of ``fusionnet``, grouped by the module that defines it."""

    def lines(self) -> list[str]:
        import fusionnet

        by_module: dict[str, list[str]] = {}
        for name in fusionnet.__all__:
            obj = getattr(fusionnet, name)
            if not (inspect.getdoc(obj) or "").strip():
                raise self.error(f"fusionnet.{name} has no docstring: the API reference documents every public name "
                                 "from its docstring; write one")
            by_module.setdefault(obj.__module__, []).append(name)
        out: list[str] = [".. automodule:: fusionnet", ""]  # the package docstring: what a user calls, by task
        for module in sorted(by_module):
            out += [f"``{module}``", "-" * (len(module) + 4), ""]
            for name in by_module[module]:
                obj = getattr(fusionnet, name)
                if isinstance(obj, type) and issubclass(obj, BaseException):
                    out += [f".. autoexception:: fusionnet.{name}", ""]
                elif isinstance(obj, type):
                    bases = ["   :show-inheritance:"] if obj.__bases__ != (object,) else []
                    out += [f".. autoclass:: fusionnet.{name}", "   :members:", *bases, ""]
                else:
                    out += [f".. autofunction:: fusionnet.{name}", ""]
        return out


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("`", "'") if text else " "


class SettingsReference(GeneratedRst):
    """A table per settings dataclass: field, type, default, flag, help."""

    def lines(self) -> list[str]:
        from fusionnet import config

        classes = {name: obj for name, obj in vars(config).items()
                   if isinstance(obj, type) and dataclasses.is_dataclass(obj)}
        missing = set(classes) - set(SETTINGS)
        if missing:
            raise self.error(f"settings classes {sorted(missing)} are not in docs/_ext/fusionnet_docs.SETTINGS: add "
                             "them so the settings reference shows them")
        out: list[str] = []
        for name in SETTINGS:
            cls = classes[name]
            doc = (inspect.getdoc(cls) or "").split("\n\n")[0]
            out += [name, "-" * len(name), "", f"``fusionnet.config.{name}``: {doc}", ""]
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if cls is config.TrainConfig:  # a table per concern, as --help groups them
                for concern, names in config.train.TRAIN_CONCERNS.items():
                    out += [f"**{concern}**", "", *_table(cls, [fields[n] for n in names])]
            else:
                out += _table(cls, list(fields.values()))
        return out


def _flag(f: dataclasses.Field, hint) -> str:
    if "help" not in f.metadata:
        return ""  # not a flag: set in Python or a config file
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return "--[no-]" + flag[2:] if hint is bool else flag


def _table(cls, fields: list[dataclasses.Field]) -> list[str]:
    hints = typing.get_type_hints(cls)
    out = [".. list-table::", "   :header-rows: 1", "   :widths: 18 18 14 20 40", "",
           "   * - field", "     - type", "     - default", "     - flag", "     - what it does"]
    for f in fields:
        flag = _flag(f, hints.get(f.name))
        out += [f"   * - ``{f.name}``", f"     - {_cell(_type_name(hints.get(f.name, f.type)))}",
                f"     - ``{_default(f)}``", f"     - {('``' + flag + '``') if flag else ' '}",
                f"     - {_cell(f.metadata.get('help', ''))}"]
    return out + [""]


def cli_parser():
    """``fusionnet``'s own parser (:func:`fusionnet.cli.main.build_parser`) with each command's "examples:" lines
    (its description in ``--help``) turned into a literal block, so the page shows them as commands, as typed."""
    from fusionnet.cli.main import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    for sub in commands.choices.values():
        if sub.description and sub.description.startswith("examples:\n"):
            sub.description = "Examples::\n\n" + sub.description.split("\n", 1)[1]
    return parser


def setup(app):
    app.add_directive("fusionnet-api", ApiReference)
    app.add_directive("fusionnet-settings", SettingsReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
