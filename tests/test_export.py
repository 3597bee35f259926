"""Export to / import from the authors' PyTorch layout (reference §5) and the CLI around it."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import named_setup, random_params, run_cli, save_checkpoint

from morpheus_jax.apps.export import export_checkpoint, import_weights
from morpheus_jax.ckpt import torch_files as files
from morpheus_jax.ckpt import torch_layout
from morpheus_jax.ckpt.checkpoint import read_checkpoint, resolve_step_dir, write_checkpoint
from morpheus_jax.core.config import Config
from morpheus_jax.core.errors import ExportError
from morpheus_jax.core.spec import GroupLayout, ModelSpec
from morpheus_jax.model.morpheus import init_model
from morpheus_jax.model.params import ParamCodec

ROOT = Path(__file__).resolve().parent.parent
TORCH_KWARGS = ("hidden_size", "num_prototypes", "wsi_dim", "group_hidden", "encoder_layers", "encoder_heads",
                "encoder_mlp_dim", "encoder_dropout", "decoder_layers", "decoder_heads", "decoder_mlp_dim",
                "decoder_dropout")


def torch_kwargs(cfg):
    return {k: getattr(cfg.model, k) for k in TORCH_KWARGS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg, groups, features, layouts = named_setup(encoder_layers=2, decoder_layers=2, encoder_heads=2)
    params = random_params(cfg, layouts, seed=1)
    run = tmp_path_factory.mktemp("export") / "run"
    save_checkpoint(run, cfg, groups, features, params)
    return cfg, groups, features, layouts, params, run


# -- §5 at paper shapes --------------------------------------------------------------------------------

def reference_keys(groups, h=256, p=16, wsi=1536, gh=256, mlp=256, enc_layers=1, dec_layers=1, decoders=True):
    """§5 written out (independently of torch_layout)."""
    keys = {"global_token": (1, 1, h), "wsi_tokenizer.prototypes": (p, h),
            "wsi_tokenizer.kv_norm.weight": (wsi,), "wsi_tokenizer.kv_norm.bias": (wsi,),
            "wsi_tokenizer.k_proj.weight": (h, wsi), "wsi_tokenizer.k_proj.bias": (h,),
            "wsi_tokenizer.v_proj.weight": (h, wsi), "wsi_tokenizer.v_proj.bias": (h,),
            "wsi_tokenizer.q_norm.weight": (h,), "wsi_tokenizer.q_norm.bias": (h,),
            "wsi_tokenizer.output_proj.weight": (h, h), "wsi_tokenizer.output_proj.bias": (h,),
            "wsi_tokenizer.out_norm.weight": (h,), "wsi_tokenizer.out_norm.bias": (h,),
            "norm.weight": (h,), "norm.bias": (h,)}

    def block(prefix, cross):
        keys.update({f"{prefix}.norm1.weight": (h,), f"{prefix}.norm1.bias": (h,),
                     f"{prefix}.attn.qkv.weight": (3 * h, h), f"{prefix}.attn.qkv.bias": (3 * h,),
                     f"{prefix}.attn.out_proj.weight": (h, h), f"{prefix}.attn.out_proj.bias": (h,),
                     f"{prefix}.norm2.weight": (h,), f"{prefix}.norm2.bias": (h,),
                     f"{prefix}.mlp.linear1.weight": (mlp, h), f"{prefix}.mlp.linear1.bias": (mlp,),
                     f"{prefix}.mlp.linear2.weight": (h, mlp), f"{prefix}.mlp.linear2.bias": (h,)})
        if cross:
            keys.update({f"{prefix}.norm_cross_attn.weight": (h,), f"{prefix}.norm_cross_attn.bias": (h,)})
            for proj in ("to_q", "to_k", "to_v", "out_proj"):
                keys.update({f"{prefix}.cross_attn.{proj}.weight": (h, h), f"{prefix}.cross_attn.{proj}.bias": (h,)})

    for i in range(enc_layers):
        block(f"encoder_blocks.{i}", False)
    for m, sizes in groups.items():
        for g, size in sizes.items():
            t = f"omics_tokenizers.{m}.token_mlp_dict.{g}"
            keys.update({f"{t}.0.0.weight": (gh, size), f"{t}.0.0.bias": (gh,),
                         f"{t}.1.0.weight": (h, gh), f"{t}.1.0.bias": (h,)})
        if not decoders:
            continue
        d = f"omics_decoders.{m}"
        keys.update({f"{d}.mask_tokens": (1, 1, h), f"{d}.id_embeddings": (1, len(sizes), h),
                     f"{d}.decoder_embed.weight": (h, h), f"{d}.decoder_embed.bias": (h,),
                     f"{d}.decoder_norm.weight": (h,), f"{d}.decoder_norm.bias": (h,)})
        for i in range(dec_layers):
            block(f"{d}.decoder_blocks.{i}", True)
        for g, size in sizes.items():
            r = f"{d}.reverse_tokenizer.token_reverse.{g}"
            keys.update({f"{r}.0.0.weight": (gh, h), f"{r}.0.0.bias": (gh,),
                         f"{r}.1.weight": (size, gh), f"{r}.1.bias": (size,)})
    return keys


def test_paper_shapes_export_keys_equal_reference():
    import torch

    from morpheus_jax.core.config import load_config
    from morpheus_jax.torch import MorpheusProto, MorpheusProtoEncoder

    cfg = load_config("paper")
    sizes = json.loads((ROOT / "morpheus_jax" / "configs" / "paper_group_sizes.json").read_text())
    groups = {m: {g: [f"{m}:{g}:{j}" for j in range(s)] for g, s in zip(v["groups"], v["sizes"])}
              for m, v in sizes.items()}
    layouts = {m: GroupLayout.from_mapping(groups[m], [f for fs in groups[m].values() for f in fs],
                                           cfg.model.group_buckets) for m in cfg.model.modalities}
    model = init_model(cfg.model, layouts, 0)
    flat = {k: np.asarray(v) for k, v in ParamCodec(model).flatten(model).items()}
    group_sizes = {m: dict(zip(v["groups"], v["sizes"])) for m, v in sizes.items()}

    full = torch_layout.to_torch(flat, layouts, cfg.model)
    ref = reference_keys(group_sizes)
    assert list(full) == list(torch_layout.torch_schema(cfg.model, group_sizes))
    assert {k: v.shape for k, v in full.items()} == ref
    assert abs(sum(v.size for v in full.values()) / 1e6 - 33.98) < 0.01
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in full.values())

    enc = torch_layout.to_torch(flat, layouts, cfg.model, encoder_only=True)
    assert {k: v.shape for k, v in enc.items()} == reference_keys(group_sizes, decoders=False)
    rna_only = torch_layout.to_torch(flat, layouts, cfg.model, encoder_only=True, modalities=["rna"])
    assert {k: v.shape for k, v in rna_only.items()} == reference_keys({"rna": group_sizes["rna"]}, decoders=False)

    # The PyTorch modules have exactly these keys too (what strict loading checks).
    torch.manual_seed(0)
    tm = MorpheusProto(group_sizes)
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == ref
    te = MorpheusProtoEncoder({"rna": group_sizes["rna"]}, n_outputs=5)
    want = reference_keys({"rna": group_sizes["rna"]}, decoders=False)
    want.update({"final_layer.1.weight": (5, 256), "final_layer.1.bias": (5,)})
    assert {k: tuple(v.shape) for k, v in te.state_dict().items()} == want
    assert set(MorpheusProtoEncoder(n_outputs=2).state_dict()) == {
        k for k in reference_keys({}, decoders=False)} | {"final_layer.1.weight", "final_layer.1.bias"}


# -- round trips ----------------------------------------------------------------------------------------

def test_layout_round_trip_is_bitwise_and_pads_with_zeros(tiny):
    cfg, groups, features, layouts, params, _ = tiny
    sd = torch_layout.to_torch(params, layouts, cfg.model)
    back = torch_layout.from_torch(sd, layouts, cfg.model)
    assert set(back) == set(params)
    for k in params:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)
    # A transposed Linear and a per-group slice, by hand.
    np.testing.assert_array_equal(sd["encoder_blocks.1.attn.qkv.weight"], params["encoder_blocks.1.attn.qkv.kernel"].T)
    lay = layouts["dnam"]
    g = lay.buckets[1][0]
    name, off = lay.group_names[g], lay.entry_offsets()
    np.testing.assert_array_equal(sd[f"omics_tokenizers.dnam.token_mlp_dict.{name}.0.0.weight"],
                                  params["omics_tokenizers.dnam.w1"][off[g]: off[g + 1]].T)
    np.testing.assert_array_equal(sd[f"omics_decoders.dnam.reverse_tokenizer.token_reverse.{name}.1.bias"],
                                  params["omics_decoders.dnam.reverse_tokenizer.b2"][off[g]: off[g + 1]])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_import_round_trip_bitwise(tiny, tmp_path, suffix):
    cfg, groups, features, layouts, params, run = tiny
    out = tmp_path / f"model{suffix}"
    assert run_cli(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    sd, side = files.read_weights(out)
    assert side["modalities"] == ["rna", "dnam", "cnv"] and side["encoder_only"] is False
    assert side["group_names"]["rna"] == list(groups["rna"]) and side["feature_names"]["cnv"] == features["cnv"]
    assert side["config"]["encoder_heads"] == 2 and side["step"] == 7
    assert list(sd) == list(torch_layout.torch_schema(cfg.model, torch_layout.group_sizes(layouts))) or \
        suffix == ".safetensors"   # safetensors stores keys sorted
    # Import with the sidecar (no flags) and with explicit mappings and heads (as for the authors' files).
    assert run_cli(["import-torch", str(out), "--out", str(tmp_path / "imp")]) == 0
    maps = {}
    for m, grp in groups.items():
        maps[m] = tmp_path / f"{m}.json"
        maps[m].write_text(json.dumps(grp))
    out.with_name(out.name + ".json").unlink()
    assert run_cli(["import-torch", str(out), "--out", str(tmp_path / "imp2"), "--num-heads", "2",
                    "--decoder-num-heads", "4", "--mapping"] + [f"{m}={p}" for m, p in maps.items()]) == 0
    ck = read_checkpoint(tmp_path / "imp")
    assert set(ck.params) == set(params) and ck.step == 7
    for k in params:
        np.testing.assert_array_equal(ck.params[k], params[k], err_msg=k)
    assert ck.config.model == cfg.model and ck.groups == groups
    assert ck.features == features   # the sidecar's canonical order
    # Without a sidecar the other settings are the defaults (e.g. 4 buckets), the weights the same.
    ck2 = read_checkpoint(tmp_path / "imp2")
    assert (ck2.config.model.encoder_heads, ck2.config.model.decoder_heads) == (2, 4)
    assert ck2.config.model.group_buckets == Config().model.group_buckets != cfg.model.group_buckets
    sd2 = torch_layout.to_torch(ck2.params, ck2.layouts, ck2.config.model)
    assert sd2.keys() == sd.keys() and all(np.array_equal(sd[k], sd2[k]) for k in sd)
    # An imported checkpoint exports to the same file contents.
    again = tmp_path / f"again{suffix}"
    assert run_cli(["export", "--checkpoint", str(tmp_path / "imp"), "--out", str(again)]) == 0
    sd3, _ = files.read_weights(again)
    assert sd3.keys() == sd.keys() and all(np.array_equal(sd[k], sd3[k]) for k in sd)


def test_bfloat16_and_encoder_only_exports(tiny, tmp_path):
    import torch

    cfg, groups, features, layouts, params, run = tiny
    out = tmp_path / "enc.pt"
    assert run_cli(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(out), "--encoder-only",
                    "--modalities", "cnv,rna", "--dtype", "bfloat16"]) == 0
    raw = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in raw.values())
    side = json.loads(out.with_name("enc.pt.json").read_text())
    assert side["modalities"] == ["rna", "cnv"] and side["encoder_only"] and side["module"] == "MorpheusProtoEncoder"
    assert not any(k.startswith(("omics_decoders.", "omics_tokenizers.dnam.", "final_layer")) for k in raw)
    full = torch_layout.to_torch(params, layouts, cfg.model)
    for k, v in raw.items():
        want = torch.from_numpy(full[k]).to(torch.bfloat16)
        assert torch.equal(v, want), k
    # The same through safetensors (no torch involved in writing).
    st = tmp_path / "enc.safetensors"
    assert run_cli(["export", "--checkpoint", str(resolve_step_dir(run)), "--out", str(st), "--encoder-only",
                    "--dtype", "bfloat16"]) == 0
    sd, _ = files.read_weights(st)
    key = "omics_tokenizers.dnam.token_mlp_dict.dnam_g0.1.0.weight"
    np.testing.assert_array_equal(sd[key], torch.from_numpy(full[key]).to(torch.bfloat16).float().numpy())


def test_authors_state_dict_imports_losslessly(tmp_path):
    """A state dict saved by a PyTorch MorpheusProto (the authors' keys; random, non-trivial values,
    different head counts) → import-torch with mapping files → export gives the same tensors."""
    import torch

    from morpheus_jax.torch import MorpheusProto

    cfg, groups, features, layouts = named_setup(encoder_heads=8, decoder_heads=2, group_buckets=3)
    torch.manual_seed(3)
    tm = MorpheusProto({m: {g: len(f) for g, f in grp.items()} for m, grp in groups.items()}, **torch_kwargs(cfg))
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pth = tmp_path / "pretrained_models" / "morpheus.pth"
    pth.parent.mkdir()
    torch.save({"state_dict": tm.state_dict()}, pth)   # wrapped, as some training scripts save
    maps = []
    for m, grp in groups.items():
        (tmp_path / f"{m}.json").write_text(json.dumps(grp))
        maps.append(f"{m}={tmp_path / f'{m}.json'}")
    ckpt = tmp_path / "imported"
    assert run_cli(["import-torch", str(pth), "--num-heads", "8", "--decoder-num-heads", "2", "--out", str(ckpt),
                    "--mapping"] + maps) == 0
    ck = read_checkpoint(ckpt)
    assert ck.config.model.encoder_heads == 8 and ck.config.model.decoder_heads == 2
    assert ck.config.model.group_buckets == Config().model.group_buckets and ck.config.model.hidden_size == 32
    assert ck.features == {m: list(dict.fromkeys(f for fs in grp.values() for f in fs)) for m, grp in groups.items()}
    out = tmp_path / "back.pt"
    assert run_cli(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    back = torch.load(out, weights_only=True)
    orig = tm.state_dict()
    assert set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) for k in orig)
    tm.load_state_dict(back, strict=True)


def test_errors_name_the_problem(tiny, tmp_path, capsys):
    cfg, groups, features, layouts, params, run = tiny
    out = tmp_path / "m.safetensors"
    assert run_cli(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    sd, side = files.read_weights(out)

    with pytest.raises(files.WeightFileError, match="unsupported suffix"):
        export_checkpoint(run, tmp_path / "m.npz")
    with pytest.raises(FileExistsError):
        export_checkpoint(run, out)
    assert run_cli(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ExportError, match="--encoder-only"):
        export_checkpoint(run, tmp_path / "y.pt", modalities=["rna"])

    bad = dict(sd)
    key = "omics_tokenizers.cnv.token_mlp_dict.cnv_g1.0.0.weight"
    bad[key] = bad[key][:, :-1]
    files.write_weights(tmp_path / "bad.safetensors", bad, side)
    with pytest.raises(ExportError, match="cnv_g1"):
        import_weights(tmp_path / "bad.safetensors", tmp_path / "i1")
    bad = dict(sd)
    bad["encoder_blocks.0.mlp.linear2.weight"] = bad["encoder_blocks.0.mlp.linear2.weight"][:, :5]
    files.write_weights(tmp_path / "bad2.safetensors", bad, side)
    with pytest.raises(torch_layout.LayoutError, match=r"encoder_blocks\.0\.mlp\.linear2\.weight"):
        import_weights(tmp_path / "bad2.safetensors", tmp_path / "i2")
    extra = dict(sd, **{"final_layer.1.weight": np.zeros((2, 32), np.float32),
                        "final_layer.1.bias": np.zeros(2, np.float32)})
    files.write_weights(tmp_path / "head.safetensors", extra, side)
    with pytest.raises(ExportError, match="final_layer"):
        import_weights(tmp_path / "head.safetensors", tmp_path / "i3")
    files.write_weights(tmp_path / "noside.safetensors", sd, None)
    with pytest.raises(ExportError, match="--mapping rna=JSON dnam=JSON cnv=JSON"):
        import_weights(tmp_path / "noside.safetensors", tmp_path / "i4")
    wrong = {g: f for g, f in list(groups["rna"].items())[:-1]}
    with pytest.raises(ExportError, match="mapping groups and weight-file groups differ"):
        import_weights(tmp_path / "noside.safetensors", tmp_path / "i5", mappings={**groups, "rna": wrong})
    with pytest.raises(Exception, match="not divisible"):
        import_weights(out, tmp_path / "i6", num_heads=5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_weights(out, tmp_path / "busy")
    with pytest.raises(torch_layout.LayoutError, match="'.'"):
        torch_layout.torch_schema(cfg.model, {"rna": {"a.b": 3}})


# -- README's PyTorch section runs as written ------------------------------------------------------------------

def _doc_blocks(text):
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        yield lang, body.replace("\\\n", " ")


def test_pytorch_docs_example_runs(tiny, tmp_path, monkeypatch):
    import torch

    import morpheus_jax
    from morpheus_jax import api
    from morpheus_jax.torch import MorpheusProto

    cfg, groups, features, layouts, params, run = tiny
    monkeypatch.chdir(tmp_path)
    assert morpheus_jax.load is api.load
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(run)
    # What a user of the authors' code holds: their state dict and their mapping files.
    names = {"rna": "hallmarks_genes", "dnam": "dnam_chr_genes", "cnv": "cnv_chr_genes"}
    (tmp_path / "data" / "mappings").mkdir(parents=True)
    for m, grp in groups.items():
        (tmp_path / "data" / "mappings" / f"{names[m]}.json").write_text(json.dumps(grp))
    (tmp_path / "pretrained_models").mkdir()
    kw = dict(torch_kwargs(cfg), encoder_heads=8, decoder_heads=8)
    torch.save(MorpheusProto({m: {g: len(f) for g, f in grp.items()} for m, grp in groups.items()}, **kw).state_dict(),
               tmp_path / "pretrained_models" / "morpheus.pth")

    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Using the weights in PyTorch")
    end = readme.find("\n## ", start + 10)
    text = readme[start: end if end > 0 else None]
    namespace: dict = {}
    ran = {"bash": 0, "python": 0}
    for lang, body in _doc_blocks(text):
        if lang == "bash":
            for line in body.splitlines():
                if line.strip():
                    argv = shlex.split(line)
                    assert argv[0] == "morpheus"
                    assert run_cli(argv[1:]) == 0, line
        else:
            exec(compile(body, "README.md", "exec"), namespace)
        ran[lang] += 1
    assert ran == {"bash": 2, "python": 3}
    assert namespace["tokens"].shape == (2, 1 + cfg.model.num_prototypes + len(groups["rna"]), 32)
    assert namespace["cnv_genes"].shape == (2, len(features["cnv"]))


# -- checkpoints: params-only reads, the bucketed layout of 0.1 --------------------------------------

def test_export_reads_no_optimizer_state(tiny, tmp_path, monkeypatch):
    """Export deserialises the parameters only, never the AdamW moments or the rest of the
    train state (every array Orbax reads is recorded)."""
    from orbax.checkpoint import type_handlers

    cfg, groups, features, layouts, params, run = tiny
    read = []
    for cls in (type_handlers.NumpyHandler, type_handlers.ArrayHandler, type_handlers.ScalarHandler):
        async def spy(self, infos, args=None, _original=cls.deserialize):
            read.extend(i.name for i in infos)
            return await _original(self, infos, args)
        monkeypatch.setattr(cls, "deserialize", spy)
    path, _ = export_checkpoint(run, tmp_path / "w.safetensors")
    assert sorted(read) == sorted(f"params.{n}" for n in params)
    sd, _ = files.read_weights(path)
    want = torch_layout.to_torch(params, layouts, cfg.model)
    assert set(sd) == set(want)
    for k in want:
        np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


def _bucketed(params, layouts):
    """The 0.1 layout, built by hand: per bucket, each group's rows zero-padded to the widest."""
    out = {n: v for n, v in params.items()
           if not re.match(r"omics_(tokenizers\.\w+\.(w1|b1)|decoders\.\w+\.reverse_tokenizer\.(w2|b2))$", n)}
    for m, lay in layouts.items():
        off = lay.entry_offsets()
        tok, rev = f"omics_tokenizers.{m}", f"omics_decoders.{m}.reverse_tokenizer"
        for b, bucket in enumerate(lay.buckets):
            width, gh = lay.bucket_width(b), params[f"{tok}.w1"].shape[1]
            w1, b1 = np.zeros((len(bucket), width, gh), np.float32), np.zeros((len(bucket), gh), np.float32)
            w2, b2 = np.zeros((len(bucket), gh, width), np.float32), np.zeros((len(bucket), width), np.float32)
            for slot, g in enumerate(bucket):
                rows, size = slice(off[g], off[g + 1]), lay.sizes[g]
                w1[slot, :size], b1[slot] = params[f"{tok}.w1"][rows], params[f"{tok}.b1"][g]
                w2[slot, :, :size], b2[slot, :size] = params[f"{rev}.w2"][rows].T, params[f"{rev}.b2"][rows]
            out.update({f"{tok}.w1.{b}": w1, f"{tok}.b1.{b}": b1, f"{rev}.w2.{b}": w2, f"{rev}.b2.{b}": b2})
    return out


def test_checkpoints_of_the_bucketed_layout_still_load(tiny, tmp_path):
    """A checkpoint written by morpheus-jax 0.1 (per-bucket stacks, no param_layout in its spec)
    reads as the canonical parameters, so export and `morpheus_jax.load` work on it."""
    import dataclasses

    import morpheus_jax
    cfg, groups, features, layouts, params, _ = tiny
    assert len(layouts["rna"].buckets) > 1
    old = _bucketed(params, layouts)
    spec = dataclasses.replace(ModelSpec.build(cfg, groups, features), param_layout=1)
    step_dir = write_checkpoint(tmp_path / "old" / "checkpoints", 3, old, spec)
    meta = json.loads((step_dir / "spec" / "metadata").read_text())
    del meta["param_layout"]                         # 0.1 wrote no version
    (step_dir / "spec" / "metadata").write_text(json.dumps(meta))
    (step_dir / "checksums.json").unlink()            # nor checksums
    ckpt = read_checkpoint(step_dir)
    assert set(ckpt.params) == set(params)
    for k in params:
        np.testing.assert_array_equal(ckpt.params[k], params[k], err_msg=k)
    model = morpheus_jax.load(step_dir)
    assert model.step == 3 and model.has_decoders
