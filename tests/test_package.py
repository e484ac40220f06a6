import subprocess
import sys
import tempfile


def _run(code: str) -> str:
    # Run outside the repository so that the repository root is not on sys.path.
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_solver_import_does_not_import_transformers():
    out = _run("import sys, hf_decoupleq.solver, hf_decoupleq.packing; print('transformers' in sys.modules)")
    assert out == "False"


def test_import_registers_quant_method_when_transformers_comes_later():
    code = (
        "import hf_decoupleq\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print(AUTO_QUANTIZER_MAPPING['decoupleq'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['decoupleq'].__name__)"
    )
    assert _run(code) == "DecoupleQHfQuantizer DecoupleQConfig"


def test_import_registers_when_transformers_came_first():
    code = (
        "import transformers\n"
        "import hf_decoupleq\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "print(AUTO_QUANTIZER_MAPPING['decoupleq'].__name__)"
    )
    assert _run(code) == "DecoupleQHfQuantizer"


def test_kernels_ship_inside_the_package_not_top_level():
    code = (
        "import importlib.util, hf_decoupleq.kernels as k\n"
        "print(k.__name__, importlib.util.find_spec('kernels') is None or 'hf_decoupleq' not in str(importlib.util.find_spec('kernels').origin))"
    )
    assert _run(code) == "hf_decoupleq.kernels True"


def test_registration_when_the_config_is_what_imports_transformers():
    for first in ("from hf_decoupleq import DecoupleQConfig", "from hf_decoupleq.config import DecoupleQConfig"):
        code = (
            f"import hf_decoupleq\n{first}\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
            "print(AUTO_QUANTIZER_MAPPING['decoupleq'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['decoupleq'].__name__)"
        )
        assert _run(code) == "DecoupleQHfQuantizer DecoupleQConfig", first


def test_config_is_a_leaf_module():
    # The config module imports neither the registration glue, the quantizer nor the pipeline; registration still
    # completes once it has been imported (the import hook of hf_decoupleq._registration watches it).
    code = (
        "import sys, hf_decoupleq\n"
        "import hf_decoupleq.config as c\n"
        "import ast, inspect\n"
        "tree = ast.parse(inspect.getsource(c))\n"
        "own = sorted({n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level})\n"
        "print(own, 'hf_decoupleq.pipeline' in sys.modules)"
    )
    assert _run(code) == "['errors', 'packing'] False"
