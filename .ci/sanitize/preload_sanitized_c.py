"""pytest plugin: import the sanitizer build of longalign_ops._C (path in LONGALIGN_SANITIZED_C)
under that module name before anything imports the package, so the tests exercise it instead
of the installed extension."""
import importlib.util
import os
import sys

path = os.environ["LONGALIGN_SANITIZED_C"]
spec = importlib.util.spec_from_file_location("longalign_ops._C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["longalign_ops._C"] = module

import longalign_ops.packing  # noqa: E402
import longalign_ops.positions  # noqa: E402

assert longalign_ops.packing._C is module and longalign_ops.positions._C is module, \
    "the sanitized extension was not the one imported"
print(f"sanitized longalign_ops._C: {path}", file=sys.stderr)
