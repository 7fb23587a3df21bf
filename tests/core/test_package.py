"""The package's shape: ``import rgo_jax`` loads the optimizer core only, never the harness."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import rgo_jax

PACKAGE = Path(rgo_jax.__file__).parent
HARNESS_ONLY = ("matplotlib", "sklearn", "tqdm", "orbax", "PIL")


def _core_files():
    # ``rgo_jax/__main__.py`` (``python -m rgo_jax``, the harness's command) runs only when
    # executed, never on import.
    return [
        p
        for p in PACKAGE.rglob("*.py")
        if "bench" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
    ]


def test_fresh_import_loads_only_core_modules():
    code = "import json, sys; import rgo_jax; print(json.dumps(sorted(m for m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    ours = [m for m in loaded if m == "rgo_jax" or m.startswith("rgo_jax.")]
    assert ours, "rgo_jax itself was not loaded"
    assert not [m for m in ours if m.startswith("rgo_jax.bench")], ours
    core_names = {
        "rgo_jax."
        + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in _core_files()
    } | {"rgo_jax"}
    assert set(ours) <= core_names, set(ours) - core_names
    heavy = [m for m in loaded if m.split(".")[0] in HARNESS_ONLY]
    assert not heavy, f"import rgo_jax loaded harness dependencies {sorted(set(heavy))[:5]}"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_core_never_imports_the_harness():
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p) if "bench" in m)
        for p in _core_files()
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_public_names_are_listed_and_exist():
    assert len(set(rgo_jax.__all__)) == len(rgo_jax.__all__)
    for name in rgo_jax.__all__:
        assert hasattr(rgo_jax, name), name
    # ``rgo_jax.bench`` becomes an attribute of the package once anything in the process
    # imports the harness (other test modules do at collection); it is not a core name.
    public = {n for n in vars(rgo_jax) if not n.startswith("_")} - {"bench"}
    assert public == set(rgo_jax.__all__), public ^ set(rgo_jax.__all__)
