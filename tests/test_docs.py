"""The documentation site builds with warnings as errors, its generated references hold every public name, command,
flag and setting, its pages render in a browser, and the README's headline table is the site's measured figures.
(Every example on the pages runs in tests/test_examples.py.)"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = pytest.mark.xdist_group("docs")  # one worker builds the site once for both tests


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
                           str(DOCS), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _text(html: str) -> str:
    """The page's words, tags and scripts gone, runs of white space one space."""
    return " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)).split())


def test_references_hold_every_name_command_flag_and_setting(site):
    import fusionnet
    from fusionnet import config
    from fusionnet.cli.main import build_parser

    api = (site / "reference" / "api.html").read_text()
    for name in fusionnet.__all__:
        assert f'id="fusionnet.{name}"' in api, name
    cli = _text((site / "reference" / "cli.html").read_text())
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    for command, sub in commands.choices.items():
        assert re.search(rf"\bfusionnet {command}\b", cli), command
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # -h is every command's; the reference leaves it out
            assert action.help, f"fusionnet {command} {action.option_strings or action.dest}: no help text"
            for flag in action.option_strings:
                assert re.search(rf"(^|\s){re.escape(flag)}(\s|,|$)", cli), (command, flag)
    settings = _text((site / "reference" / "settings.html").read_text())
    for cls in vars(config).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            assert cls.__name__ in settings
            for f in dataclasses.fields(cls):
                assert re.search(rf"\b{f.name}\b", settings), (cls.__name__, f.name)


def test_pages_render_in_a_browser(site, tmp_path):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set $CHROMIUM)")
    from PIL import Image

    pages = [line.strip() for line in (DOCS / "index.md").read_text().splitlines()
             if re.fullmatch(r"[a-z/-]+", line.strip())]
    for page, title in (("index", "fusionnet"), ("reference/cli", "Command line")):
        url = (site / f"{page}.html").as_uri()
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        assert f"<title>{title}" in dom, page
        text = _text(dom)
        for raw in ("```", "{toctree}", "{eval-rst}", "](", ".. auto", ".. argparse", ".. list-table"):
            assert raw not in text, (page, raw)  # Markdown or a directive left unrendered
        links = {urljoin(url, href) for href in re.findall(r'href="([^"#]+)', dom)}
        for linked in set(pages) - {page}:  # the navigation links every other page
            assert (site / f"{linked}.html").as_uri() in links, (page, linked)
        shot = tmp_path / f"{page.replace('/', '_')}.png"
        subprocess.run([*args, "--window-size=1280,1400", f"--screenshot={shot}", url], capture_output=True,
                       timeout=120)
        colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50, page  # text, a sidebar and a title: not a blank page


def test_readme_headline_table_is_the_sites_figures():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from fusionnet_figures import markdown_table
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_the_layout_table_names_every_module():
    """docs/extending.md's table of layers is the map: every module of every subpackage is in its package's row."""
    rows = re.findall(r"^\| (.*?) \| (.*)$", (DOCS / "extending.md").read_text(), flags=re.M)
    table = {package: row for first, row in rows for package in re.findall(r"`(\w+)/`", first)}
    package = ROOT / "fusionnet"
    for folder in sorted(p for p in package.iterdir() if (p / "__init__.py").is_file()):
        assert folder.name in table, folder.name
        for module in folder.iterdir():
            name = module.stem if module.suffix == ".py" else module.name
            if name.startswith("__") or not (module.suffix == ".py" or (module / "__init__.py").is_file()):
                continue
            assert re.search(rf"`({folder.name}/)?{name}(\.py|/)?[`:]", table[folder.name]), \
                f"fusionnet/{folder.name}/{module.name} is not in docs/extending.md's table"
