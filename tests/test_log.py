"""pyllama.enable_logging / disable_logging / set_llama_log_level: the public switch for
pyllama's and llama.cpp's log lines (what LLM(verbose=True) and `--verbose` use).

Logging is process-global state, so each scenario runs in a fresh interpreter."""

from __future__ import annotations

import json


def test_enable_disable_and_threshold(run_python, tiny_model_path):
    code = f"""
import io, json, logging
import pyllama
from pyllama import Model

out = {{}}
buf = io.StringIO()
h1 = pyllama.enable_logging(stream=buf)
h2 = pyllama.enable_logging(logging.INFO, stream=buf)
out["same_handler"] = h1 is h2
out["handlers"] = len(logging.getLogger("pyllama").handlers)
Model({str(tiny_model_path)!r}).close()
out["enabled_lines"] = len(buf.getvalue().splitlines())
out["mentions_loader"] = "llama_model_loader" in buf.getvalue() or "print_info" in buf.getvalue()

pyllama.disable_logging()
before = len(buf.getvalue())
Model({str(tiny_model_path)!r}).close()
out["after_disable"] = len(buf.getvalue()) - before
out["handlers_after"] = len(logging.getLogger("pyllama").handlers)

# An application with its own handler only sets the threshold: warnings and above.
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.levelno)
logging.getLogger("pyllama").addHandler(Keep())
logging.getLogger("pyllama").setLevel(logging.DEBUG)
pyllama.set_llama_log_level(logging.WARNING)
Model({str(tiny_model_path)!r}).close()
out["min_level_forwarded"] = min(records) if records else None
pyllama.set_llama_log_level(logging.INFO)
Model({str(tiny_model_path)!r}).close()
out["info_forwarded"] = logging.INFO in records
try:
    pyllama.enable_logging("INFO")
except TypeError:
    out["bad_level"] = "TypeError"
print(json.dumps(out))
"""
    r = run_python(code, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same_handler"] and out["handlers"] == 1          # idempotent
    assert out["enabled_lines"] > 5 and out["mentions_loader"]    # llama.cpp's lines arrive
    assert out["after_disable"] == 0 and out["handlers_after"] == 0
    assert out["min_level_forwarded"] is None or out["min_level_forwarded"] >= 30   # nothing below WARNING
    assert out["info_forwarded"]
    assert out["bad_level"] == "TypeError"


def test_quiet_by_default(run_python, tiny_model_path):
    """A library stays silent unless asked: loading a model prints nothing to stderr."""
    r = run_python(f"from pyllama import LLM; LLM({str(tiny_model_path)!r}, n_ctx=64).close()", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""
