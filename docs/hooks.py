"""MkDocs hook: the site shows the committed records where they are kept.

Experiments write their figures and results to results/NAME/, benchmarks to
benchmarks/results/, and the notebook lives in notebooks/: copying them into
docs/ would leave two copies to drift apart. This hook adds those files to the
site under the same relative paths, so a page in docs/ links to
`results/equality/equality.png` and the strict build checks that it exists.
"""

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
# Folders of the repository published beside the pages, and the files taken from each.
SHOWN = {"results": ("*.png", "*.json", "*.jsonl", "*.log"),
         "benchmarks/results": ("*.png", "*.json"),
         "notebooks": ("*.ipynb",)}


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns the notebook into a page
def on_files(files, config):
    for folder, patterns in SHOWN.items():
        for pattern in patterns:
            for path in sorted((ROOT / folder).rglob(pattern)):
                if ".ipynb_checkpoints" in path.parts:
                    continue
                files.append(File(str(path.relative_to(ROOT)), str(ROOT), config["site_dir"],
                                  config["use_directory_urls"]))
    return files
