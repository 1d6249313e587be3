"""SGLang adapter, CPU: the plugin entry point, registration through SGLang's own plugin loader,
the server-args parser (all three attention-backend flags), and the example YAML configs,
against the installed SGLang 0.5.16."""

import argparse
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

if os.environ.get("ENGINE_BACKEND_REQUIRE_SGLANG", "0") not in ("", "0"):
    import sglang  # noqa: F401  (the SGLang CI step: a missing SGLang must fail, never skip)
else:
    pytest.importorskip("sglang")

import sglang.srt.plugins as sglang_plugins
from sglang.srt import server_args as sglang_server_args
from sglang.srt.layers.attention import attention_registry
from sglang.srt.server_args import ServerArgs, prepare_server_args

from engine_backend.adapters.sglang import BACKEND_NAME
from engine_backend.adapters.sglang.plugin import create_backend, register

import sglang_fixtures as fixtures

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("sglang-*.yaml"))
OURS = BACKEND_NAME
FLAGS = ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend")


@pytest.fixture
def unregistered(monkeypatch):
    """Our name removed from SGLang's choices and registry for one test, restored after.

    The list and dict are mutated in place: the parser's Arg metadata and the ModelRunner's
    backend setup hold references to these very objects."""
    choices = sglang_server_args.ATTENTION_BACKEND_CHOICES
    saved = list(choices)
    while BACKEND_NAME in choices:
        choices.remove(BACKEND_NAME)
    monkeypatch.delitem(attention_registry.ATTENTION_BACKENDS, BACKEND_NAME, raising=False)
    yield
    choices[:] = saved


def our_entry_point():
    matches = [ep for ep in entry_points(group=sglang_plugins.GENERAL_PLUGINS_GROUP) if ep.name == BACKEND_NAME]
    assert len(matches) == 1, "engine_backend is not installed here (pip install --no-deps -e .)"
    return matches[0]


def parse(argv):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


def registered_here() -> bool:
    return (
        BACKEND_NAME in sglang_server_args.ATTENTION_BACKEND_CHOICES
        and attention_registry.ATTENTION_BACKENDS.get(BACKEND_NAME) is create_backend
    )


# ------------------------------------------------------------------ entry point
def test_entry_point_is_discoverable_and_is_register():
    ep = our_entry_point()
    assert ep.group == "sglang.srt.plugins"
    assert ep.value == "engine_backend.adapters.sglang.plugin:register"
    assert ep.load() is register


def test_register_adds_choice_and_factory_once(unregistered):
    assert not registered_here()
    register()
    register()
    assert sglang_server_args.ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1
    assert attention_registry.ATTENTION_BACKENDS[BACKEND_NAME] is create_backend


def test_sglang_plugin_loader_registers_us(unregistered, monkeypatch):
    """SGLang's own load_plugins() (what sglang serve, launch_server, Engine and every
    scheduler process call) discovers the entry point and runs it."""
    monkeypatch.setattr(sglang_plugins, "_plugins_loaded", False)
    monkeypatch.setenv("SGLANG_PLUGINS", BACKEND_NAME)  # only ours: other installed plugins stay out
    found = sglang_plugins.load_plugins_by_group(sglang_plugins.GENERAL_PLUGINS_GROUP)
    assert found[BACKEND_NAME][0] is register
    assert not registered_here()
    sglang_plugins.load_plugins()
    assert registered_here()


def test_register_stays_cheap():
    """The plugin runs in every SGLang process, the HTTP server's included: registering must
    not import the backend, the kernels or their JIT machinery (that happens when a
    ModelRunner builds the backend)."""
    code = (
        "import sys; from engine_backend.adapters.sglang.plugin import register; register(); "
        "heavy = [m for m in ('engine_backend.adapters.sglang.backend', 'engine_backend.decode', "
        "'engine_backend.prefill', 'engine_backend.kernels.jit') if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------ logging
def test_register_routes_our_messages_through_sglangs_logging():
    """After register(), a message of ours goes where SGLang's own go and obeys SGLang's level: a fresh
    interpreter configures logging the way every SGLang process does (``configure_logger`` with
    ``--log-level``), at "warning" and then at "info"."""
    code = textwrap.dedent(
        """
        import types
        from sglang.srt.utils.common import configure_logger
        from engine_backend.adapters.sglang.plugin import register
        from engine_backend.log import logger

        register()
        configure_logger(types.SimpleNamespace(log_level="warning"))
        logger().info("eb-info-at-warning")
        logger().warning("eb-warning-at-warning")
        configure_logger(types.SimpleNamespace(log_level="info"))
        logger().info("eb-info-at-info")
        print("logger:", logger().name)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logger: sglang.engine_backend" in result.stdout
    assert "eb-info-at-warning" not in result.stderr
    assert "eb-warning-at-warning" in result.stderr and "eb-info-at-info" in result.stderr
    # SGLang's format ("[date time] message"), not the package's standalone "[engine_backend] ..." one.
    line = next(line for line in result.stderr.splitlines() if "eb-warning-at-warning" in line)
    assert line.startswith("[") and "[engine_backend]" not in line


# ------------------------------------------------------------------ launchers
@pytest.mark.parametrize("module", ["sglang.launch_server", "sglang.cli.serve"])
def test_launchers_load_plugins_before_parsing_arguments(module):
    """`python -m sglang.launch_server` and `sglang serve` accept our name only because they
    call load_plugins() before prepare_server_args(); guard that order in the installed SGLang."""
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(module))
    assert "load_plugins()" in source and "prepare_server_args(" in source
    assert source.index("load_plugins()") < source.rindex("prepare_server_args(")


def test_fresh_process_runs_launch_server_sequence(tmp_path):
    """What `python -m sglang.launch_server ... --attention-backend engine_backend` does before
    starting the server, in a new interpreter that knows nothing of us but the installed
    entry point (as each SGLang process does)."""
    model = fixtures.write_model_config(tmp_path / "model")
    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins(); "
        "from sglang.srt.server_args import prepare_server_args; "
        f"a = prepare_server_args(['--model-path', {str(model)!r}, '--device', 'cpu', '--skip-tokenizer-init', "
        "'--attention-backend', 'engine_backend']); "
        "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS; "
        "print('RESOLVED', a.get_attention_backends(), 'engine_backend' in ATTENTION_BACKENDS)"
    )
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_PLUGINS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESOLVED ('engine_backend', 'engine_backend') True" in result.stdout


# ------------------------------------------------------------------ server args
@pytest.mark.parametrize("flag", FLAGS)
def test_parser_rejects_the_name_before_registration(unregistered, flag):
    with pytest.raises(SystemExit):
        parse(["--model-path", "m", flag, BACKEND_NAME])


@pytest.mark.parametrize("flag", FLAGS)
def test_parser_accepts_the_name_on_every_attention_flag(unregistered, flag):
    register()
    args = parse(["--model-path", "m", flag, BACKEND_NAME])
    assert getattr(args, flag.removeprefix("--").replace("-", "_")) == BACKEND_NAME


@pytest.mark.parametrize(
    "flags, resolved",
    [
        (["--attention-backend", BACKEND_NAME], (OURS, OURS)),
        (["--prefill-attention-backend", BACKEND_NAME, "--decode-attention-backend", BACKEND_NAME], (OURS, OURS)),
        (["--prefill-attention-backend", BACKEND_NAME, "--decode-attention-backend", "triton"], (OURS, "triton")),
        (["--prefill-attention-backend", "triton", "--decode-attention-backend", BACKEND_NAME], ("triton", OURS)),
    ],
)
def test_server_args_resolve_our_backend_per_phase(tmp_path, flags, resolved):
    """The full ServerArgs resolution (sglang serve's path) keeps our name for each phase."""
    register()
    model = fixtures.write_model_config(tmp_path / "model")
    args = prepare_server_args(["--model-path", str(model), "--device", "cpu", "--skip-tokenizer-init", *flags])
    assert args.get_attention_backends() == resolved


# ------------------------------------------------------------------ YAML configs
def test_there_are_example_configs():
    assert CONFIGS, "configs/sglang-*.yaml missing"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_config_parses_with_sglang_serve_config_flag(tmp_path, config):
    """`sglang serve --model-path M --config FILE` merges FILE through SGLang's own
    ConfigArgumentMerger into the same parser; every key must be a valid flag."""
    register()
    model = fixtures.write_model_config(tmp_path / "model")
    argv = ["--model-path", str(model), "--device", "cpu", "--skip-tokenizer-init", "--config", str(config)]
    args = prepare_server_args(argv)
    assert BACKEND_NAME in args.get_attention_backends()
