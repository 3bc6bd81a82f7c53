"""What the web UI exposes: only the PNGs it wrote (in a folder it made), models only from the configured places
(without telling a client what else exists), regular files only, bounded seeds, sizes and time, a login when
asked for, and a warning when it serves the network.

The backend tests use a recording stand-in pipeline; one test serves the real page (embedded model, gradio) on a
free local port and requests files over HTTP.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from controlnet import ui
from controlnet.errors import UserError
from controlnet.images import save_png
from cli_checks import offline_hub
from hubcache import add_to_hub_cache

SIZE = 64
PROMPT_LORAS = 10  # LoRA files in the served --models-dir: more than ui.MAX_PROMPT_LORAS
BIG_BODY = 2 * 2**20  # bytes: over ui.MAX_REQUEST_BODY, far under an upload's bound


class RecordingPipeline:
    """Records the ControlNet each unit names; returns one grey image; sleeps ``delay`` s per step."""

    native_size = SIZE

    def __init__(self, delay: float = 0.0):
        self.calls: list[dict] = []
        self.steps_run = 0
        self.delay = delay

    def __call__(self, *, controls, callback=None, progress=True, **kwargs):
        self.calls.append(dict(kwargs, controls=controls))
        for step in range(kwargs["steps"]):
            time.sleep(self.delay)
            self.steps_run += 1
            if callback is not None:
                callback(step, 999 - step, None)
        w, h = kwargs["size"]
        settings = {"seed": kwargs["seed"], "seeds": [kwargs["seed"]], "size": f"{w}x{h}"}
        return SimpleNamespace(images=[Image.new("RGB", (w, h), (128, 128, 128))], conditions=[Image.new("RGB", (w, h))
                               for _ in controls], seed=kwargs["seed"], settings=settings)


def request(model_path: str = "", model: str | None = None, **overrides) -> ui.GenerateRequest:
    unit = ui.UnitInput(enabled=bool(model_path or model), model=model, model_path=model_path,
                        image=Image.new("RGB", (SIZE, SIZE)))
    fields = dict(prompt="a red circle", steps=2, seed=1, width=SIZE, height=SIZE, units=[unit] if unit.enabled else [])
    fields.update(overrides)
    return ui.GenerateRequest(**fields)


@pytest.fixture
def models(tmp_path) -> Path:
    """A --models-dir with a model file and a model folder; beside it (outside) a secret file."""
    root = tmp_path / "models"
    (root / "folder-model").mkdir(parents=True)
    (root / "cn.safetensors").write_bytes(b"weights")
    (root / "folder-model" / "config.json").write_text("{}")
    (tmp_path / "secret.safetensors").write_bytes(b"not yours")
    return root


def backend_for(models: Path, tmp_path: Path, pipe=None, **kwargs) -> ui.UiBackend:
    return ui.UiBackend(pipe or RecordingPipeline(), tmp_path / "out", model_roots=[models], **kwargs)


# --------------------------------------------------------------------------- model paths


def test_models_inside_the_roots_reach_the_pipeline_as_real_paths(models, tmp_path):
    pipe = RecordingPipeline()
    backend = backend_for(models, tmp_path, pipe)
    for given, expected in [(str(models / "cn.safetensors"), models / "cn.safetensors"),
                            (str(models / "folder-model"), models / "folder-model"),
                            (str(models / "sub" / ".." / "cn.safetensors"), models / "cn.safetensors")]:
        outcome = backend.generate(request(given))
        assert outcome.ok, outcome.status
        assert pipe.calls[-1]["controls"][0].controlnet == str(expected.resolve())
    assert backend.generate(request(model="fill")).ok  # a bundled name
    assert pipe.calls[-1]["controls"][0].controlnet == "fill"


def test_paths_outside_the_roots_get_one_message_whether_they_exist_or_not(models, tmp_path):
    pipe = RecordingPipeline()
    backend = backend_for(models, tmp_path, pipe)
    (models / "escape").symlink_to(tmp_path / "secret.safetensors")
    statuses = {}
    for name, text in [("existing", str(tmp_path / "secret.safetensors")), ("missing", str(tmp_path / "nope")),
                       ("dotdot", str(models / ".." / "secret.safetensors")), ("symlink", str(models / "escape")),
                       ("etc", "/etc/passwd"), ("home", "~/.ssh/id_rsa")]:
        outcome = backend.generate(request(text))
        assert not outcome.ok
        statuses[name] = outcome.status.replace(repr(text), "PATH")
    assert set(statuses.values()) == {"Error: ControlNet unit 1: model path PATH is not a file in the allowed "
                                      "folders; put the model in a --models-dir folder, or choose a bundled one"}
    assert pipe.calls == []


def test_hub_ids_come_from_the_cache_only_and_never_from_local_paths(models, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = add_to_hub_cache(cache, "org/cn", {"config.json": b"{}", "model.safetensors": b"w"})
    offline_hub(monkeypatch, cache)
    pipe = RecordingPipeline()
    backend = ui.UiBackend(pipe, tmp_path / "out", model_roots=[models, cache])
    assert backend.generate(request("org/cn")).ok
    assert pipe.calls[-1]["controls"][0].controlnet == str(snapshot.resolve())
    assert backend.generate(request("org/cn/model.safetensors")).ok
    assert Path(pipe.calls[-1]["controls"][0].controlnet).parent.parent.parent == (cache / "models--org--cn").resolve()
    # A relative name spelled like a hub id is looked up in the cache, never on the server's disk.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "thing").mkdir(parents=True)
    here, absent = backend.generate(request("local/thing")), backend.generate(request("other/thing"))
    assert not here.ok and not absent.ok
    assert here.status.replace("local/thing", "X") == absent.status.replace("other/thing", "X")
    assert "hub id in its Hugging Face cache" in here.status


def test_fifos_are_refused_without_blocking(models, tmp_path):
    os.mkfifo(models / "fifo.safetensors")
    os.mkfifo(models / "folder-model" / "diffusion_pytorch_model.safetensors")
    backend = backend_for(models, tmp_path)
    outcomes = []
    worker = threading.Thread(target=lambda: outcomes.extend(
        backend.generate(request(str(models / name))) for name in ("fifo.safetensors", "folder-model")), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "a FIFO blocked the generation slot"
    assert [o.ok for o in outcomes] == [False, False]
    assert "fifo.safetensors' is not a file in the allowed folders" in outcomes[0].status  # the one message
    assert "diffusion_pytorch_model.safetensors in it is not a regular file" in outcomes[1].status


def test_allow_any_path_and_the_config_roots(models, tmp_path, monkeypatch):
    pipe = RecordingPipeline()
    assert ui.UiBackend(pipe, tmp_path / "out").generate(request(str(tmp_path / "secret.safetensors"))).ok
    offline_hub(monkeypatch, tmp_path / "hub")
    roots = ui.UiConfig(models_dirs=(str(models),)).model_roots()
    assert roots[0] == models and roots[-1] == tmp_path / "hub" and roots[1].name == "controlnets"
    assert ui.UiConfig(models_dirs=(str(models),), allow_any_path=True).model_roots() is None


# --------------------------------------------------------------------------- seeds, sizes, time


@pytest.mark.parametrize("seed, ok", [(2**63 - 1, True), (0, True), (2**63, False), (-2, False), (10**30, False)])
def test_seed_range(tmp_path, seed, ok):
    pipe = RecordingPipeline()
    outcome = ui.UiBackend(pipe, tmp_path).generate(request(seed=seed))
    assert outcome.ok == ok, outcome.status
    if ok:
        assert pipe.calls[-1]["seed"] == seed
    else:
        assert "seed must be -1 (random) or a whole number in 0..9223372036854775807" in outcome.status


def test_sizes_beyond_the_page_are_refused_before_anything_runs(tmp_path):
    pipe = RecordingPipeline()
    backend = ui.UiBackend(pipe, tmp_path)
    outcome = backend.generate(request(width=99_992, height=64))
    assert not outcome.ok and f"must be in 1..{ui.MAX_SIZE}" in outcome.status and pipe.calls == []
    condition, status = backend.preview(ui.UnitInput(image=Image.new("RGB", (8, 8))), 99_999, 99_999)
    assert condition is None and f"must be in 1..{ui.MAX_SIZE}" in status


def test_a_generation_past_the_timeout_is_stopped(tmp_path):
    pipe = RecordingPipeline(delay=0.05)
    outcome = ui.UiBackend(pipe, tmp_path, timeout=0.12).generate(request(steps=100))
    assert not outcome.ok and "generation stopped" in outcome.status and "the server's --timeout" in outcome.status
    assert pipe.steps_run < 10 and list(tmp_path.iterdir()) == []
    assert ui.UiBackend(RecordingPipeline(), tmp_path, timeout=60).generate(request(steps=3)).ok


def test_a_generation_that_would_end_past_the_timeout_stops_at_its_second_step(tmp_path):
    pipe = RecordingPipeline(delay=0.05)  # 100 steps x 0.05 s: about 5 s, past a 2 s timeout
    outcome = ui.UiBackend(pipe, tmp_path, timeout=2.0).generate(request(steps=100))
    assert not outcome.ok and "past the server's --timeout of 2 s" in outcome.status, outcome.status
    assert pipe.steps_run == 2 and list(tmp_path.iterdir()) == []


def test_a_request_too_large_for_the_timeout_is_refused_before_it_starts(tmp_path):
    pipe = RecordingPipeline(delay=0.02)
    backend = ui.UiBackend(pipe, tmp_path, timeout=60)
    assert backend.generate(request(steps=5)).ok  # measures the pace: about 0.02 s a step at 64x64
    assert backend.seconds_per_pixel_step is not None
    runs = len(pipe.calls)
    # 2048 x 2048 x 4 images x 100 steps at that pace: about 2048 x 4 x 100 x 0.02 s, far past 60 s
    outcome = backend.generate(request(steps=100, width=2048, height=2048, num_images=4))
    assert not outcome.ok and "more than the server's --timeout of 60 s" in outcome.status, outcome.status
    assert len(pipe.calls) == runs  # the pipeline never ran
    assert backend.generate(request(steps=5)).ok  # a request of the measured size still runs


def test_sampling_work_counts_pixels_images_steps_and_the_hires_pass():
    from controlnet.img2img import HiresFix

    assert ui.sampling_work(dict(size=(64, 32), num_images=3, steps=10)) == 64 * 32 * 3 * 10
    hires = dict(size=(64, 32), num_images=1, steps=10, hires=HiresFix(2.0, 0.5, 4))
    assert ui.sampling_work(hires) == 64 * 32 * 10 + 64 * 32 * 4 * 4
    picture = Image.new("RGB", (40, 20))
    assert ui.sampling_work(dict(size=None, init_image=picture, num_images=1, steps=2)) == 40 * 20 * 2


# --------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_serving_the_network_prints_a_warning(host, warned, tmp_path, capsys, monkeypatch):
    pytest.importorskip("gradio", reason="the web UI's extra is not installed")

    def stop(config):
        raise UserError("stopped before loading")

    monkeypatch.setattr(ui, "create_backend", stop)
    with pytest.raises(UserError, match="stopped before loading"):
        ui.launch(ui.UiConfig(host=host, port=_free_port(), output_dir=str(tmp_path / "o")), block=False)
    err = capsys.readouterr().err
    assert ("warning: serving on 0.0.0.0" in err and "--auth USER:PASSWORD" in err) == warned
    assert not (tmp_path / "o").exists()


def test_config_checks():
    for config, message in [(ui.UiConfig(port=0), "--port"), (ui.UiConfig(auth=("u", "")), "USER:PASSWORD"),
                            (ui.UiConfig(timeout=0), "--timeout"), (ui.UiConfig(models_dirs=("/no/such",)), "not a folder"),
                            (ui.UiConfig(max_pixels=0), "--max-pixels")]:
        with pytest.raises(UserError, match=message):
            config.check()


def _get(url: str, cookie: str | None = None) -> int:
    req = urllib.request.Request(url)
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_served_files_are_only_the_uis_own_and_a_login_guards_them(tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason="the web UI's extra is not installed")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / ".secret").write_text("token")
    (outputs / "notes.txt").write_text("private")
    save_png(outputs / "earlier.png", Image.new("RGB", (8, 8)))
    port = _free_port()
    app = ui.launch(ui.UiConfig(port=port, output_dir=str(outputs), auth=("user", "pass")), block=False, quiet=True)
    try:
        base = f"http://127.0.0.1:{port}"
        (own,) = [p for p in outputs.iterdir() if p.is_dir()]  # the folder the UI made for this run
        mine = save_png(own / "generated.png", Image.new("RGB", (8, 8)))
        file_url = f"{base}/gradio_api/file="
        assert _get(f"{base}/config") == 401 and _get(file_url + str(mine)) == 401  # no login, nothing
        form = urllib.parse.urlencode({"username": "user", "password": "pass"}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{base}/login", data=form), timeout=20) as response:
            cookie = "; ".join(c.split(";")[0] for c in response.headers.get_all("set-cookie"))
        assert _get(f"{base}/config", cookie) == 200
        assert _get(file_url + str(mine), cookie) == 200
        for other in (".secret", "notes.txt", "earlier.png"):
            assert _get(file_url + str(outputs / other), cookie) == 403, other
    finally:
        app.close()


# --------------------------------------------------------------------------- the served page, over HTTP


def _tiny_lora(unet, path: Path, seed: int) -> Path:
    """A diffusers/peft-layout LoRA on the attention projections of ``unet`` (rank 2), saved at ``path``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_v")) and isinstance(module, torch.nn.Linear):
            layers[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.1
            layers[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.1
    save_file(layers, str(path))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page served on a free local port (embedded model, --models-dir holding LoRAs, a 120 s --timeout), with
    files outside the models folder a client must not reach: a LoRA, a corrupt file, a PNG, a file to overwrite."""
    pytest.importorskip("gradio", reason="the web UI's extra is not installed")
    gradio_client = pytest.importorskip("gradio_client")
    from controlnet.lora import adapters_in

    root = tmp_path_factory.mktemp("served")
    models, outside = root / "models", root / "outside"
    models.mkdir()
    outside.mkdir()
    captured = {}
    create = ui.create_backend

    def keep(config):
        captured["backend"] = create(config)
        return captured["backend"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(ui, "create_backend", keep)
        port = _free_port()
        app = ui.launch(ui.UiConfig(port=port, output_dir=str(root / "out"), models_dirs=(str(models),),
                                    timeout=120), block=False, quiet=True)
        try:
            backend = captured["backend"]
            unet = backend.pipeline.unet
            for k in range(PROMPT_LORAS):
                _tiny_lora(unet, models / f"style{k}.safetensors", seed=k)
            _tiny_lora(unet, outside / "secret.safetensors", seed=99)
            (outside / "corrupt.safetensors").write_bytes(b"Zcorrupt bytes")
            (models / "escape.safetensors").symlink_to(outside / "secret.safetensors")
            secret_png = save_png(outside / "secret.png", Image.new("RGB", (SIZE, SIZE), (12, 34, 56)))
            target = outside / "keep.json"
            target.write_text("mine")
            image = save_png(root / "upload.png", Image.new("RGB", (SIZE, SIZE), (200, 200, 200)))
            client = gradio_client.Client(f"http://127.0.0.1:{port}", verbose=False)
            yield SimpleNamespace(
                url=f"http://127.0.0.1:{port}", client=client, backend=backend, models=models, outside=outside,
                secret_png=secret_png, target=target, image=gradio_client.handle_file(str(image)),
                adapters=lambda: adapters_in(unet))
        finally:
            app.close()


# The endpoint's inputs: the prompt ("data"), param_1, then each unit's ui.UNIT_FIELDS from param_2, then the
# page's other fields. Fields after the units are written below by their index in a page of 10-field units.
FIRST_UNIT, OLD_UNIT_FIELDS = 2, 10


def _param(index: int) -> str:
    """The endpoint's name of input ``index`` (counted in a page of 10-field units)."""
    after_units = FIRST_UNIT + ui.MAX_UNITS * OLD_UNIT_FIELDS
    if index >= after_units:
        index += ui.MAX_UNITS * (len(ui.UNIT_FIELDS) - OLD_UNIT_FIELDS)
    return f"param_{index}"


def _generate(served, prompt: str, **fields) -> str:
    """Press Generate over HTTP (the page's own endpoint); returns the status line."""
    # Each unit's model path, image, parameters box and control type (and the img2img pictures) have no default.
    no_default = [ui.UNIT_FIELDS.index(name) for name in ("model_path", "image", "annotator_params", "control_type")]
    values = {f"param_{FIRST_UNIT + len(ui.UNIT_FIELDS) * unit + k}": None if ui.UNIT_FIELDS[k] == "image" else ""
              for unit in range(ui.MAX_UNITS) for k in no_default}
    values.update({"data": prompt, _param(33): None, _param(34): None, _param(40): 2, _param(43): 1,
                   _param(44): SIZE, _param(45): SIZE})
    values.update({_param(int(k.removeprefix("param_"))): v for k, v in fields.items()})
    result = served.client.predict(**values, api_name="/on_generate")
    return result[3]


def _preview(served, annotator: str, params: str) -> tuple:
    """Press a unit's Preview over HTTP; returns (condition, status)."""
    return served.client.predict(served.image, annotator, params, SIZE, SIZE, api_name="/lambda")


@pytest.mark.slow
def test_served_annotator_parameters_never_name_server_files(served):
    for annotator, params in [("inpaint", f"mask={served.secret_png}"), ("openpose", f"json={served.target}"),
                              ("openpose", "weights=/etc"), ("hed", "weights=org/repo"),
                              ("pose_json", f"keypoints={served.target}"), ("inpaint", "MASK=x".lower())]:
        condition, status = _preview(served, annotator, params)
        assert condition is None, (annotator, params)
        assert "names a file on the server, which the page does not take from a browser" in status, status
    assert served.target.read_text() == "mine"
    # Generate takes the same parameters box: the same refusal, nothing written.
    status = _generate(served, "a red circle", param_2=True, param_5=served.image, param_6="openpose",
                       param_7=f"json={served.target}")
    assert "json= names a file on the server" in status, status
    assert served.target.read_text() == "mine"
    condition, status = _preview(served, "canny", "low_threshold=50")  # other parameters still work
    assert condition is not None and status.startswith("Condition from canny"), status


@pytest.mark.slow
def test_served_lora_tags_reach_only_the_models_folder_with_one_message(served):
    statuses = {}
    outside = served.outside
    for name in ["/etc/passwd", "/etc/nonexistent", str(outside / "secret.safetensors"), str(outside / "secret"),
                 "../outside/secret", str(outside / "corrupt.safetensors"), "escape", "org/repo", "missing"]:
        status = _generate(served, f"a red circle <lora:{name}>")
        statuses[name] = status.replace(name, "NAME")
    assert len(set(statuses.values())) == 1, statuses
    (message,) = set(statuses.values())
    assert message.startswith("Error: LoRA tag <lora:NAME>: no LoRA of that name in the LoRA folder"), message
    assert not any("secret" in name or "corrupt" in name for name in served.adapters())
    assert _generate(served, "a red circle <lora:style0:0.5>").startswith("Done"), "a LoRA in --models-dir loads"


@pytest.mark.slow
def test_served_prompt_loras_are_bounded_least_recently_used_first(served):
    names = [f"style{k}" for k in range(PROMPT_LORAS)]
    for name in names:
        assert _generate(served, f"a red circle <lora:{name}>").startswith("Done")
        if name == names[3]:
            assert _generate(served, "a red circle <lora:style0>").startswith("Done")  # style0 used again
    loaded = set(served.adapters())
    assert PROMPT_LORAS - 2 == ui.MAX_PROMPT_LORAS
    # The least recently used went first: style1 and style2 (style0 was used after them).
    assert loaded == {"style0", *names[3:]}


@pytest.mark.slow
def test_served_request_bodies_are_bounded_on_every_endpoint(served):
    import http.client

    join = "/gradio_api/queue/join"
    big = b'{"data": ["' + b"x" * BIG_BODY + b'"], "fn_index": 0, "session_hash": "abc"}'

    def post(path: str, body, headers: dict) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", int(served.url.rsplit(":", 1)[1]), timeout=30)
        try:
            connection.request("POST", path, body=body, headers=headers, encode_chunked="Content-Length" not in headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    assert post(join, big, {"Content-Type": "application/json", "Content-Length": str(len(big))})[0] == 413
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: counted as it arrives
    assert post(join, chunks, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})[0] == 413
    assert post("/gradio_api/info", big, {"Content-Length": str(len(big))})[0] == 413
    boundary = "b0undary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
              f"Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG" + b"\0" * BIG_BODY \
        + f"\r\n--{boundary}--\r\n".encode()
    status, _ = post("/gradio_api/upload", upload, {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                               "Content-Length": str(len(upload))})
    assert status == 200  # an upload may be larger than other requests (up to MAX_UPLOAD)


@pytest.mark.slow
def test_served_request_too_large_for_the_timeout_is_refused_before_it_starts(served):
    assert _generate(served, "a red circle", param_40=4).startswith("Done")  # the server measures its pace
    assert served.backend.seconds_per_pixel_step is not None
    outputs = set(served.backend.output_dir.iterdir())
    status = _generate(served, "a red circle", param_40=100, param_44=2048, param_45=2048, param_46=4)
    assert "more than the server's --timeout of 120 s" in status, status
    assert set(served.backend.output_dir.iterdir()) == outputs
