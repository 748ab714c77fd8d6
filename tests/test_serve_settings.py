"""The service's settings are declared once (issue 26): ``serve/settings.py``'s fields carry
each setting's default, help, flag, Ray argument name and bounds; the command line, Ray's
app args and the docs' flag tables must agree with them. No server, no Ray cluster."""

from __future__ import annotations

import re

import pytest

from magicanimate_rt.errors import InputError
from magicanimate_rt.serve.settings import (RAY_ARGS, RayOptions, ServeSettings, declared, from_given,
                                            parse_ray_args)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def serve_parser():
    from magicanimate_rt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["serve"]


def test_flags_and_ray_args_give_the_same_settings(tmp_path):
    # every setting given once as a flag and once as Ray's key=value text: the same objects
    key = tmp_path / "key"
    key.write_text("a-key-of-twenty-chars\n")
    values = {"models": str(tmp_path), "backend": "torch", "dtype": "bfloat16", "memory_gb": "6.5",
              "data_dir": str(tmp_path / "d"), "max_queue": "3", "max_upload_mb": "1.5", "max_frames": "20",
              "max_steps": "7", "max_side": "256", "keep_hours": "0.5", "shutdown_grace_s": "2",
              "examples_dir": str(tmp_path), "api_key_file": str(key), "densepose_weights": str(tmp_path / "dp.pkl"),
              "device": "cuda", "replicas": "3",
              "gpus_per_replica": "2", "cpus_per_replica": "4", "ranks_per_replica": "2"}
    flags = {d.key: d.flag for cls in (ServeSettings, RayOptions) for _, d in declared(cls)}
    argv = ["serve", "--ray"] + [x for k, v in values.items() for x in (flags[k], v)]
    from_cli = from_given(vars(serve_parser().parse_args(argv[1:])))
    from_ray = from_given(parse_ray_args(values))
    assert from_cli == from_ray
    settings, ray = from_ray
    assert (settings.max_upload_bytes, settings.shutdown_grace_s, settings.api_key, settings.memory_gb) == \
        (int(1.5 * 2**20), 2.0, "a-key-of-twenty-chars", 6.5)
    options = RayOptions(**ray).check()
    assert options.rank_resources() == {"num_cpus": 2.0, "num_gpus": 1.0}
    # the keys Ray takes: the declared ones, and no command-line-only setting
    assert set(values) <= set(RAY_ARGS) and not {"host", "port", "address", "dashboard_port", "devices"} & set(RAY_ARGS)
    # the budget's old name, as a flag and as a key, gives the same setting
    old_flag = serve_parser().parse_args(["--models", str(tmp_path), "--gpu-memory-gb", "6.5"])
    assert from_given(vars(old_flag))[0].memory_gb == from_given(parse_ray_args({"gpu_memory_gb": "6.5"}))[0].memory_gb \
        == 6.5


def test_help_shows_the_declared_defaults():
    text = " ".join(serve_parser().format_help().split())
    assert "jobs that may wait (running ones not counted); more get 429 (default 16)" in text
    assert "the largest request body in MiB; more get 413 (default 200)" in text
    assert "--max-side MAX_SIDE" in text and "(default 1024)" in text
    assert ServeSettings().max_queue == 16 and ServeSettings().max_upload_mb == 200.0  # (the defaults above)


@pytest.mark.parametrize("args, message", [
    ({"max_queue": "-1"}, "--max-queue must be >= 0, got -1"),
    ({"max_upload_mb": 0}, "--max-upload-mb must be > 0, got 0"),
    ({"keep_hours": "0"}, "--keep-hours must be > 0, got 0"),
    ({"shutdown_grace_s": -1}, "--shutdown-grace must be >= 0, got -1"),
    ({"max_side": 32}, "--max-side must be >= 64, got 32"),
    ({"max_side": 4096}, "--max-side must be <= 2048, got 4096"),
    ({"memory_gb": 0}, "--memory-gb must be a number of GiB > 0, got 0.0"),
    ({"gpu_memory_gb": -1}, "--memory-gb must be a number of GiB > 0, got -1.0"),  # the old name, the same check
])
def test_bounds_are_one_line_naming_the_flag(tmp_path, args, message):
    settings, _ = from_given(parse_ray_args(dict(args, models=str(tmp_path), data_dir=str(tmp_path / "d"))))
    with pytest.raises(InputError) as e:
        settings.check()
    assert str(e.value) == message


def test_a_bad_ray_arg_names_it():
    with pytest.raises(InputError, match=r"a bad argument value: max_queue='many'"):
        parse_ray_args({"max_queue": "many"})
    with pytest.raises(InputError, match="unknown argument 'port'"):
        parse_ray_args({"port": 8000})  # (Serve's http_options)


def test_the_docs_flag_tables_show_the_declared_defaults():
    # docs/serving.md and docs/ray-serve.md list the flags with their defaults: each row whose
    # flags and defaults pair up must show the declaration's default (a changed default fails here)
    fields = {d.flag: f.default for cls in (ServeSettings, RayOptions) for f, d in declared(cls) if d.flag}
    checked = set()
    for page in ("serving.md", "ray-serve.md"):
        for row in (ROOT / "docs" / page).read_text().splitlines():
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            if len(cells) < 3 or not cells[0].startswith("`--"):
                continue
            names = re.findall(r"`(--[a-z-]+)", cells[0])
            defaults = [d.strip().removeprefix("./") for d in cells[1].split(",")]
            if len(names) != len(defaults):
                continue
            for name, shown in zip(names, defaults):
                default = fields.get(name)
                if default is None:
                    continue
                want = f"{default:g}" if isinstance(default, float) else str(default)
                assert shown == want, (page, name, shown, want)
                checked.add(name)
    assert {"--port", "--max-queue", "--max-upload-mb", "--max-frames", "--max-steps", "--max-side",
            "--keep-hours", "--shutdown-grace", "--data-dir", "--replicas", "--ranks-per-replica",
            "--dashboard-port"} <= checked
