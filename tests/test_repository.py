"""The repository as a reader gets it: every document it cites is in it, and every convention the kit names
is stated on the conventions page."""
import os
import re

from minirlhf.kit.registry import CONVENTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_document_the_repository_cites_is_in_it():
    """A reader who clones minirlhf has only what is in it: every .md file named in the code, the demos, the
    tests or the top-level files exists, as a path from the repository's root or from the citing file, or
    by its name (CONVENTIONS.md) somewhere in the repository."""
    present = {name for folder in ("minirlhf", "demos", ".") for name in os.listdir(os.path.join(ROOT, folder))
               if name.endswith(".md")}
    missing = {}
    for folder in ("minirlhf", "demos", "tests", ".ci", "."):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if folder == "." and dirpath != ROOT:
                continue
            for name in files:
                if not name.endswith((".py", ".md", ".cfg", ".toml")) and name != "run":
                    continue
                with open(os.path.join(dirpath, name)) as f:
                    for md in re.findall(r"[\w./-]*[A-Za-z_]\.md\b", f.read()):
                        if not (os.path.exists(os.path.join(ROOT, md)) or os.path.exists(os.path.join(dirpath, md))
                                or ("/" not in md and md in present)):
                            missing.setdefault(md, os.path.relpath(os.path.join(dirpath, name), ROOT))
    assert not missing, missing


def test_every_convention_the_kit_names_is_on_the_conventions_page():
    with open(os.path.join(ROOT, "minirlhf", "CONVENTIONS.md")) as f:
        page = f.read()
    assert [c for c in CONVENTIONS if f"`[{c}]`" not in page] == []
