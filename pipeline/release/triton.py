"""`shipyard package RELEASE --triton DIR`: a Triton model repository from a verified release.

Per deployable artifact (the CPU INT8 ONNX, the OpenVINO IR, each TensorRT target's typed ONNX,
each built engine) an inference model (`onnxruntime` or `openvino` backend, or `tensorrt_plan` with
the target's profiles), and an
ensemble `<model>_text` that takes TEXT (and PAIR) and returns PREDICTION, one JSON object per row:
the shared Python-backend `preprocess` (the release's tokenizer and encoding) and `postprocess`
(the gate's task code, `pipeline.release.triton_model`) around the inference model. With
`python_runtime`, ONNX and OpenVINO inference models are Python-backend models running ONNX
Runtime or OpenVINO instead, for a server that has only the Python backend (the `nvidia-pytriton`
wheel's, which is how both are proven here). Every config is
written as text from Triton's `ModelConfig` message and the repository carries its own manifest,
which `shipyard verify` checks. Written here because no tool writes a gated, signed repository.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_dir, check_output_dir
from pipeline.errors import ShipyardError
from pipeline.release import serving
from pipeline.release.manifest import ArtifactRecord, Manifest

TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
AUX_OUTPUTS = {"tag": [("word_index", "TYPE_INT64", [-1])], "span": [("context_offsets", "TYPE_INT64", [-1, 2])]}


def repository_path(release: Path) -> Path:
    """Where a run with stages.package.triton writes the repository: `<release>.triton` beside it."""
    return Path(release).with_name(Path(release).name + ".triton")


def _name(artifact: str) -> str:
    """A Triton model name for an artifact: letters, digits and underscores."""
    return "".join(c if c.isalnum() else "_" for c in artifact)


def _io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, Triton type, dims without the batch axis) of a graph's inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[tuple[str, str, list[int]]]:
        found = []
        for value in values:
            tensor = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
            found.append((value.name, TYPES[dtype], dims))
        return found

    return describe(model.graph.input), describe(model.graph.output)


def _io_ir(xml: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """`_io` of an OpenVINO IR."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))

    def describe(ports) -> list[tuple[str, str, list[int]]]:
        return [(port.get_any_name(), TYPES[port.get_element_type().to_dtype().name],
                 [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()][1:]) for port in ports]

    return describe(model.inputs), describe(model.outputs)


# The file an inference model's version folder holds, per artifact format (its weights beside it).
MODEL_FILE = {"onnx": "model.onnx", "openvino": "model.xml", "tensorrt-engine": "model.plan"}
# A CPU artifact's Triton backend, and the role of Shipyard's Python-backend model that runs it
# instead on a server with only the Python backend (`--python-runtime`), per artifact format.
CPU_SERVING = {"onnx": ("onnxruntime", "ort"), "openvino": ("openvino", "openvino")}


def _copy_model(release: Path, artifact: ArtifactRecord, folder: Path) -> None:
    """An artifact into a version folder as `MODEL_FILE`, its companion files beside it (an IR's
    weights as model.bin, where OpenVINO looks for them; external data under its own names)."""
    shutil.copy(release / artifact.path, folder / MODEL_FILE[artifact.format])
    if artifact.format == "openvino":
        shutil.copy(release / Path(artifact.path).with_suffix(".bin"), folder / "model.bin")
        return
    for data in artifact.external_data:
        shutil.copy(release / Path(artifact.path).parent / data, folder / data)


def _tensors(kind: str, io: list[tuple[str, str, list[int]]]) -> str:
    return "\n".join(f'{kind} {{ name: "{n}" data_type: {t} dims: [{", ".join(map(str, d))}] }}' for n, t, d in io)


def _python(name: str, role: str, inputs, outputs, max_batch: int, python_path: str) -> str:
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n{_tensors("input", inputs)}\n'
            f'{_tensors("output", outputs)}\n'
            f'parameters {{ key: "role" value {{ string_value: "{role}" }} }}\n'
            f'parameters {{ key: "python_path" value {{ string_value: "{python_path}" }} }}\n'
            'instance_group { kind: KIND_CPU count: 1 }\n')


def _ensemble(name: str, model: str, text_inputs, graph_inputs, graph_outputs, aux, max_batch: int,
              postprocess: str) -> str:
    def maps(kind: str, names: list[str]) -> str:
        return " ".join(f'{kind} {{ key: "{n}" value: "{n}" }}' for n in names)

    texts = [n for n, _, _ in text_inputs]
    pre = [n for n, _, _ in graph_inputs] + [n for n, _, _ in aux]
    post_in = texts + [n for n, _, _ in graph_outputs] + [n for n, _, _ in aux] + ["attention_mask"]
    steps = [
        f'step {{ model_name: "preprocess" model_version: -1 {maps("input_map", texts)} {maps("output_map", pre)} }}',
        f'step {{ model_name: "{model}" model_version: -1 {maps("input_map", [n for n, _, _ in graph_inputs])} '
        f'{maps("output_map", [n for n, _, _ in graph_outputs])} }}',
        f'step {{ model_name: "{postprocess}" model_version: -1 {maps("input_map", post_in)} '
        f'output_map {{ key: "PREDICTION" value: "PREDICTION" }} }}',
    ]
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n{_tensors("input", text_inputs)}\n'
            'output { name: "PREDICTION" data_type: TYPE_STRING dims: [1] }\n'
            f'ensemble_scheduling {{\n  ' + "\n  ".join(steps) + "\n}\n")


@functools.cache
def model_config():
    """Triton's `ModelConfig` message, from the `model_config.proto` the tritonclient package ships
    (read from its file: the package's grpc module would also want grpcio)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or spec.origin is None:
        raise ShipyardError("tritonclient is not installed: pip install tritonclient (a Shipyard dependency)")
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
    loaded = importlib.util.spec_from_file_location("tritonclient.grpc.model_config_pb2", path)
    assert loaded is not None and loaded.loader is not None
    module = sys.modules.get(loaded.name) or importlib.util.module_from_spec(loaded)
    if loaded.name not in sys.modules:
        loaded.loader.exec_module(module)
        sys.modules[loaded.name] = module
    return module.ModelConfig


def parse_config(text: str):
    """A config.pbtxt parsed as Triton parses it; a malformed one raises protobuf's ParseError."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config()())


def deployable(manifest: Manifest) -> list[ArtifactRecord]:
    """The artifacts a server runs: the CPU INT8 ONNX, the OpenVINO IR, the targets' typed ONNX and
    built engines."""
    return [a for a in manifest.artifacts if a.name in ("model.int8.cpu", "model.int8.openvino")
            or a.name.startswith("model.trt.") or a.format == "tensorrt-engine"]


def package(release: Path, out: Path, overwrite: bool = False, python_runtime: bool = False,
            python_path: str | None = None) -> dict[str, Any]:
    """Write the repository for `release` into `out` (module docstring); what it wrote."""
    from pipeline.release.manifest import list_files, write_json
    from pipeline.tasks import task_spec

    release = Path(release)
    verified = serving.intact(release, "package takes")
    manifest = verified.intact()
    record, _ = serving.load(release)
    artifacts = deployable(manifest)
    if not artifacts:
        raise ShipyardError(f"release {release} has no deployable artifact (CPU INT8, typed TensorRT ONNX or engine); "
                            "run a recipe with stages.quantize or targets")
    check_output_dir(out, overwrite)
    kind = task_spec(record.task).kind
    path = python_path or sysconfig.get_paths()["purelib"]
    shipyard_root = str(Path(__file__).resolve().parents[2])
    python_path = f"{shipyard_root}:{path}" if shipyard_root != path else path
    engine_targets = {str(t.engine.get("path")): t for t in manifest.targets if t.engine}
    written: dict[str, str] = {}
    with atomic_dir(out, overwrite) as tmp:
        texts = [("TEXT", "TYPE_STRING", [1])] + ([("PAIR", "TYPE_STRING", [1])] if record.text_pair else [])
        aux = AUX_OUTPUTS.get(kind, [])
        # Each model's own inputs and outputs: a target may ask for float16 outputs. An engine's are its
        # target's ONNX's. One postprocess per distinct output signature: an ensemble's types must match.
        onnx_of = {str(t.engine.get("path")): t.onnx for t in manifest.targets if t.engine}
        io = {a.name: _io_ir(release / a.path) if a.format == "openvino" else
              _io(release / (a.path if a.format == "onnx" else onnx_of[a.path])) for a in artifacts}
        graph_inputs = next(iter(io.values()))[0]
        max_batch = record.batch_size
        postprocess: dict[str, str] = {}
        for _, outputs in io.values():
            postprocess.setdefault(repr(outputs), "postprocess" + (f"_{len(postprocess)}" if postprocess else ""))
        roles = [("preprocess", "preprocess", texts, graph_inputs + aux)] + [
            (model, "postprocess", texts + outputs + aux + [("attention_mask", "TYPE_INT64", [-1])],
             [("PREDICTION", "TYPE_STRING", [1])])
            for outputs, model in ((io_out, postprocess[repr(io_out)]) for io_out in
                                   {repr(o): o for _, o in io.values()}.values())]
        for model, role, inputs, outputs in roles:
            folder = tmp / model / "1"
            folder.mkdir(parents=True)
            shutil.copy(Path(__file__).with_name("triton_model.py"), folder / "model.py")
            shutil.copytree(release / serving.TOKENIZER_DIR, folder / serving.TOKENIZER_DIR)
            shutil.copy(release / serving.SERVING_FILE, folder / serving.SERVING_FILE)
            (tmp / model / "config.pbtxt").write_text(_python(model, role, inputs, outputs, max_batch, python_path))
        for artifact in artifacts:
            graph_inputs, graph_outputs = io[artifact.name]
            name = _name(artifact.name)
            folder = tmp / name / "1"
            folder.mkdir(parents=True)
            _copy_model(release, artifact, folder)
            if artifact.format in CPU_SERVING:
                backend, role = CPU_SERVING[artifact.format]
                if python_runtime:
                    shutil.copy(Path(__file__).with_name("triton_model.py"), folder / "model.py")
                    config = _python(name, role, graph_inputs, graph_outputs, max_batch, python_path)
                else:
                    config = (f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {max_batch}\n'
                              f'{_tensors("input", graph_inputs)}\n{_tensors("output", graph_outputs)}\n'
                              'dynamic_batching { }\n')
            else:
                built_for = engine_targets.get(artifact.path)
                batches = [p["batch"]["max"] for p in (built_for.target.get("profiles", []) if built_for else [])]
                engine_batch = min(batches) if batches else max_batch
                groups = ", ".join(f'"{i}"' for i in range(len(batches))) or '"0"'
                config = (f'name: "{name}"\nplatform: "tensorrt_plan"\nmax_batch_size: {engine_batch}\n'
                          f'{_tensors("input", graph_inputs)}\n{_tensors("output", graph_outputs)}\n'
                          f'instance_group {{ kind: KIND_GPU count: 1 profile: [{groups}] }}\n')
            (tmp / name / "config.pbtxt").write_text(config)
            ensemble = f"{name}_text"
            (tmp / ensemble / "1").mkdir(parents=True)
            (tmp / ensemble / "config.pbtxt").write_text(
                _ensemble(ensemble, name, texts, graph_inputs, graph_outputs, aux, max_batch,
                          postprocess[repr(graph_outputs)]))
            written[artifact.name] = ensemble
        for config_file in sorted(tmp.glob("*/config.pbtxt")):  # each parses as Triton's own message
            parse_config(config_file.read_text())
        repo = manifest.model_copy(update={
            "artifacts": [a.model_copy(update={"path": f"{_name(a.name)}/1/{MODEL_FILE[a.format]}",
                                               **({"external_data": {"model.bin": a.external_data[next(iter(
                                                   a.external_data))]}} if a.format == "openvino" else {})})
                          for a in artifacts],
            "release": {"folder": str(release), "manifest_sha256": verified.manifest_sha256}})
        write_json(tmp / "manifest.json", json.loads(list_files(repo, tmp).model_dump_json()))
    return {"release": str(release), "repository": str(out), "models": written, "python_runtime": python_runtime}
