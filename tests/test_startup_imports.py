"""What a worker imports before ``READY=1``: libraries it needs only later stay out of the
start-up path (aiohttp's client for the sim backend, loaded in a thread once the connection
loop runs; qrcode and PIL, loaded for the first QR only). Each costs tens of milliseconds of
CPU per unit start (``python -X importtime``), times every unit of a host starting at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_worker_start_up_path_leaves_late_libraries_out() -> None:
    script = ("import sys, agent.main, agent.whatsapp.sim; "
              "print(' '.join(m for m in ('aiohttp', 'qrcode', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(REPO)}).stdout
    assert out.split() == []


NEONIZE_EXTRAS = ("linkpreview", "bs4", "lxml", "requests", "phonenumbers", "httpx", "tqdm",
                  "segno")


def _run(script: str) -> str:
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, check=True, env={"PYTHONPATH": str(REPO)}).stdout


def test_importing_neonize_leaves_its_unused_extras_out() -> None:
    # link previews (lxml, bs4, requests), vCards (phonenumbers), URL downloads (httpx): ~16 MB
    # of a worker's memory that no worker feature uses
    script = ("import sys; from agent.whatsapp.neonize_import import import_neonize; "
              "import_neonize(); "
              f"print(' '.join(m for m in {NEONIZE_EXTRAS!r} if m in sys.modules))")
    assert _run(script).split() == []


def test_a_deferred_extra_loads_at_its_first_use_and_later_imports_get_the_real_module() -> None:
    script = (
        "import sys; from agent.whatsapp.neonize_import import import_neonize; "
        "api = import_neonize(); import neonize.utils, linkpreview, httpx; "
        "print(neonize.utils.gen_vcard('Ana', '5511999999999').splitlines()[3]); "
        "print(api.client.link_preview.resolve() is linkpreview.link_preview); "
        "print(sys.modules['neonize.utils.iofile'].httpx.AsyncClient is httpx.AsyncClient); "
        "print(type(httpx).__name__)")
    assert _run(script).splitlines() == [
        "item1.TEL;waid=5511999999999:+55 11 99999-9999", "True", "True", "module"]


def test_structlog_is_imported_without_rich_as_in_the_packaged_venv() -> None:
    # rich comes with the development tools only; structlog imports it when it can (~30 ms)
    script = "import sys, agent.main; print('rich' in sys.modules, 'structlog' in sys.modules)"
    assert _run(script).split() == ["False", "True"]


def test_the_api_engine_imports_the_sdk_client_without_its_unused_features() -> None:
    # the SDK's package __init__s import ~3,600 modules (beta features, Bedrock, Vertex,
    # aiohttp): ~60 MB per worker on the api engine; the client and its Messages resource
    # need about a third of them
    script = (
        "import sys; from agent.anthropic_import import import_anthropic; "
        "a = import_anthropic(); c = a.AsyncAnthropic(api_key='k', base_url='http://127.0.0.1:9'); "
        "c.messages.create; a.APIStatusError, a.APIConnectionError, a.APITimeoutError; "
        "from anthropic.types import Message; "
        "print(' '.join(m for m in ('anthropic.resources.beta', 'anthropic.lib.bedrock', "
        "'anthropic.lib.vertex', 'anthropic.types.beta.skills', 'aiohttp') if m in sys.modules)); "
        "print(sum(m.startswith('anthropic') for m in sys.modules) < 1500, Message.__name__)")
    assert _run(script).splitlines() == ["", "True Message"]
