"""Pre-trained backbones: retain's ViT, weights files (safetensors, .pth, Google's .npz, timm's cache), the errors a
user gets, freezing, and the feature cache (the same results as through the backbone)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import retain
from retain import backbones
from retain.backbones import Pretrained, freeze, npz_to_timm, save_weights
from retain.cli import main
from retain.errors import ConfigError
from retain.models import build_model
from retain.vit import ViT, ViTConfig

TINY = "timm:vit_tiny_patch16_224,img_size=8,patch_size=4,in_chans=1,embed_dim=16,depth=2,num_heads=2"
CFG = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2)


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    vit = ViT(CFG)
    return save_weights(vit, tmp_path / "tiny.safetensors", TINY, (0.5,), (0.5,)), vit


# ----------------------------------------------------------------------------------------------- the ViT
def test_attention_is_softmax_of_scaled_dot_products():
    torch.manual_seed(0)
    vit = ViT(CFG).eval()
    attn, x = vit.blocks[0].attn, torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    heads = lambda t: t.view(2, 5, 2, 8).transpose(1, 2)  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((w @ heads(v)).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_prompt_tokens_sit_after_the_class_token_and_a_prefix_of_copies_changes_nothing():
    torch.manual_seed(0)
    vit = ViT(CFG).eval()
    x = torch.randn(3, 1, 8, 8)
    assert vit.tokens(x).shape == (3, 1 + 4, 16)
    prompts = torch.randn(3, 2, 16)
    prompted = vit.tokens(x, prompts=prompts)
    assert prompted.shape == (3, 1 + 2 + 4, 16)
    h = vit.embed(x)
    h = torch.cat([h[:, :1], prompts, h[:, 1:]], 1)
    for blk in vit.blocks:
        h = blk(h)
    assert torch.allclose(prompted, vit.norm(h), atol=1e-6)
    # a prefix that copies the layer's own keys and values splits each attention weight between equal copies:
    # the output is that of no prefix at all; a random prefix changes it
    blk = vit.blocks[0]
    z = blk.norm1(vit.embed(x))
    k, v = blk.attn.qkv(z).chunk(3, dim=-1)[1:]
    assert torch.allclose(blk.attn(z, (k, v)), blk.attn(z), atol=1e-5)
    assert vit.tokens(x, prefixes={0: (torch.randn(3, 3, 16), torch.randn(3, 3, 16))}).shape == (3, 5, 16)
    assert not torch.allclose(vit.tokens(x, prefixes={1: (torch.randn(3, 3, 16), torch.randn(3, 3, 16))}),
                              vit.tokens(x))


def test_deep_prompts_replace_the_running_prompt_tokens():
    torch.manual_seed(0)
    vit = ViT(CFG).eval()
    x = torch.randn(2, 1, 8, 8)
    p0, p1 = torch.randn(2, 2, 16), torch.randn(2, 3, 16)
    out = vit.tokens(x, deep_prompts={0: p0, 1: p1})
    assert out.shape == (2, 1 + 3 + 4, 16)
    # by hand: block 0 on [cls, p0, patches], then the prompt outputs swapped for p1 before block 1
    h = vit.embed(x)
    h = vit.blocks[0](torch.cat([h[:, :1], p0, h[:, 1:]], 1))
    h = vit.blocks[1](torch.cat([h[:, :1], p1, h[:, 3:]], 1))
    assert torch.allclose(out, vit.norm(h), atol=1e-6)


# ------------------------------------------------------------------------------------------------ weights
def test_saved_weights_load_through_the_run_path_with_their_hash_and_preprocessing(tiny_weights):
    path, vit = tiny_weights
    run = retain.resolve(benchmark="split-digits", mode="class", arch=TINY, weights=str(path), freeze="all")
    sc = run.build_scenario()
    model = run.build_model(sc)
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(model.features(x), vit.eval()((x - 0.5) / 0.5), atol=1e-6)  # the stored normalisation
    assert model.pretrained["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.pretrained["preprocess"] == {"mean": [0.5], "std": [0.5]}
    assert model.pretrained["preprocess_source"] == "metadata"
    assert model.pretrained["timm"] is None or isinstance(model.pretrained["timm"], str)


def test_pth_with_a_training_wrapper_and_module_prefix_loads(tmp_path, tiny_weights):
    _, vit = tiny_weights
    sd = {"state_dict": {f"module.{k}": v for k, v in vit.state_dict().items()}}
    sd["state_dict"]["module.head.weight"] = torch.zeros(10, 16)  # the checkpoint's own classifier: dropped
    torch.save(sd, tmp_path / "w.pth")
    model, info = backbones.build(TINY, str(tmp_path / "w.pth"), False, (1, 8, 8), 10)
    assert all(torch.equal(a, b) for a, b in zip(model.features.backbone.state_dict().values(),
                                                 vit.state_dict().values()))
    assert info["preprocess_source"] == "default"  # no metadata, no config.json: timm's convention, said so


def _google_layout(sd: dict[str, torch.Tensor], heads: int) -> dict[str, np.ndarray]:
    """A timm ViT state_dict written in Google's .npz layout (the inverse of the conversion under test)."""
    d = sd["cls_token"].shape[-1]
    g = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0), "embedding/bias":
         sd["patch_embed.proj.bias"], "cls": sd["cls_token"], "Transformer/posembed_input/pos_embedding":
         sd["pos_embed"], "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"]}
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p, o, a = f"Transformer/encoderblock_{i}/", f"blocks.{i}.", f"Transformer/encoderblock_{i}/" \
                  "MultiHeadDotProductAttention_1/"
        g[p + "LayerNorm_0/scale"], g[p + "LayerNorm_0/bias"] = sd[o + "norm1.weight"], sd[o + "norm1.bias"]
        g[p + "LayerNorm_2/scale"], g[p + "LayerNorm_2/bias"] = sd[o + "norm2.weight"], sd[o + "norm2.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w = sd[o + "attn.qkv.weight"][j * d:(j + 1) * d]  # [out, in]
            g[a + n + "/kernel"] = w.t().reshape(d, heads, d // heads)
            g[a + n + "/bias"] = sd[o + "attn.qkv.bias"][j * d:(j + 1) * d].reshape(heads, d // heads)
        g[a + "out/kernel"] = sd[o + "attn.proj.weight"].t().reshape(heads, d // heads, d)
        g[a + "out/bias"] = sd[o + "attn.proj.bias"]
        g[p + "MlpBlock_3/Dense_0/kernel"], g[p + "MlpBlock_3/Dense_0/bias"] = sd[o + "mlp.fc1.weight"].t(), \
            sd[o + "mlp.fc1.bias"]
        g[p + "MlpBlock_3/Dense_1/kernel"], g[p + "MlpBlock_3/Dense_1/bias"] = sd[o + "mlp.fc2.weight"].t(), \
            sd[o + "mlp.fc2.bias"]
        i += 1
    return {k: v.detach().numpy() for k, v in g.items()}


def test_google_npz_converts_to_the_same_network(tmp_path, tiny_weights):
    _, vit = tiny_weights
    np.savez(tmp_path / "g.npz", **_google_layout(vit.state_dict(), heads=2))
    model, _ = backbones.build(TINY, str(tmp_path / "g.npz"), False, (1, 8, 8), 10)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(model.features.backbone.eval()(x), vit.eval()(x), atol=1e-5)
    with pytest.raises(ConfigError, match="not a Google ViT checkpoint"):
        npz_to_timm({"something": torch.zeros(1)})


def test_timm_cache_is_found_without_weights(tmp_path, monkeypatch, tiny_weights):
    path, _ = tiny_weights
    snap = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(path.read_bytes())
    (snap / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.1], "std": [0.2]}}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    arch = TINY.replace("vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k")
    found, source = backbones.locate_weights(arch, None, False)
    assert (found, source) == (snap / "model.safetensors", "cache")


def test_missing_weights_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    code = main(["run", "--benchmark", "split-digits", "--mode", "class", "--model", "timm:vit_base_patch16_224",
                 ])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--weights PATH" in err and "--download" in err and "timm/vit_base_patch16_224" in err
    code = main(["run", "--benchmark", "split-digits", "--model", TINY, "--weights", str(tmp_path / "nope.pth"),
                 ])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_weights_of_another_model_are_refused_before_training(tmp_path, capsys, tiny_weights):
    path, _ = tiny_weights
    other = TINY.replace("depth=2", "depth=3")
    code = main(["run", "--benchmark", "split-digits", "--mode", "class", "--model", other, "--weights", str(path),
                 ])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not fit --model" in err and "keys missing (blocks.2." in err
    wide = TINY.replace("embed_dim=16", "embed_dim=32")
    with pytest.raises(ConfigError, match=r"shapes differ \(cls_token \[1, 1, 16\] in the file, \[1, 1, 32\]"):
        retain.run(benchmark="split-digits", mode="class", arch=wide, weights=str(path))


def test_malformed_names_and_options_are_errors(tiny_weights):
    path, _ = tiny_weights
    for arch, match in [("timm:vit tiny", "expected timm:NAME"), ("timm:vit_tiny_patch16_224,depth", "key=value"),
                        ("timm:vit_tiny_patch16_224,depth=x", "depth must be a number"),
                        ("timm:vit_tiny_patch16_224,foo=1", "foo is not one of them"),
                        ("timm:vit_tiny_patch16_224,img_size=30", "not a multiple of patch_size")]:
        with pytest.raises(ConfigError, match=match):
            retain.resolve(benchmark="split-digits", arch=arch, weights=str(path))
    with pytest.raises(ConfigError, match="--freeze all freezes a pre-trained backbone"):
        retain.resolve(benchmark="split-digits", freeze="all")
    with pytest.raises(ConfigError, match="drop --normalize"):
        retain.resolve(benchmark="split-digits", arch=TINY, weights=str(path), normalize=(0.1, 0.3))


# ----------------------------------------------------------------------------------------------- freezing
def test_freeze_all_blocks_and_prefixes():
    torch.manual_seed(0)
    for how, trainable in [("all", set()), ("none", None), ("1", {"blocks.1.", "norm."}),
                           ("patch_embed,blocks.0", {"cls_token", "pos_embed", "blocks.1.", "norm."})]:
        model = Pretrained(ViT(CFG), 4, img_size=8, in_chans=1)
        freeze(model, how)
        names = {n for n, p in model.features.backbone.named_parameters() if p.requires_grad}
        if trainable is None:
            assert len(names) == len(list(model.features.backbone.parameters()))
        else:
            assert {n for n in names if not n.startswith(tuple(trainable))} == set()
            assert all(any(n.startswith(t) for n in names) for t in trainable)
        assert model.head.weight.requires_grad
    with pytest.raises(ConfigError, match="has 2 blocks"):
        freeze(Pretrained(ViT(CFG), 4), "3")
    with pytest.raises(ConfigError, match="no parameter of the backbone starts with 'blokcs'"):
        freeze(Pretrained(ViT(CFG), 4), "blokcs")


def test_frozen_batch_norm_keeps_its_statistics_in_training(tmp_path):
    net = build_model("resnet18-reduced", (1, 28, 28), 10)
    save_weights(net, tmp_path / "r.safetensors", "resnet18-reduced", (0.5,), (0.5,))
    model, _ = backbones.build("resnet18-reduced", str(tmp_path / "r.safetensors"), False, (1, 28, 28), 4)
    freeze(model, "all")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(torch.rand(8, 1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)


def test_a_method_that_never_trains_the_backbone_refuses_another_freeze(tiny_weights):
    from dataclasses import dataclass

    from retain.method import Method

    @dataclass
    class Probe(Method):
        freeze = "all"

    path, _ = tiny_weights
    with pytest.raises(ConfigError, match="needs --freeze all"):
        retain.resolve(benchmark="split-digits", arch=TINY, weights=str(path), freeze="none", method=Probe())
    with pytest.raises(ConfigError, match="learns on a pre-trained backbone"):
        retain.resolve(benchmark="split-digits", method=Probe())


# ------------------------------------------------------------------------------------------ feature cache
def test_cached_features_give_the_same_run_and_are_reused(tiny_weights):
    path, _ = tiny_weights
    common = dict(benchmark="split-digits", mode="class", arch=TINY, weights=str(path), freeze="all", epochs=2)
    live = retain.run(**common, feature_cache="off").to_dict()
    first = retain.run(**common).to_dict()
    again = retain.run(**common).to_dict()
    assert live["model"]["feature_cache"] == {"used": False, "why": "--feature-cache off"}
    assert first["model"]["feature_cache"]["used"] and not first["model"]["feature_cache"]["hit"]
    assert again["model"]["feature_cache"]["hit"]
    assert np.allclose(live["accuracy_matrix"], first["accuracy_matrix"], atol=1e-9)
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    assert first["model"]["trainable"] == 16 * 10 + 10 == live["model"]["trainable"]
    assert first["model"]["parameters"] == live["model"]["parameters"]
    assert first["model"]["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_no_cache_where_it_would_not_be_exact(tiny_weights):
    path, _ = tiny_weights
    r = retain.run(benchmark="split-digits", mode="class", arch=TINY, weights=str(path), freeze="1", epochs=1)
    assert r.to_dict()["model"]["feature_cache"] == {"used": False,
                                                     "why": "the backbone is not wholly frozen (--freeze 1)"}


def test_the_cli_runs_a_frozen_backbone(tiny_weights, tmp_path, capsys):
    path, _ = tiny_weights
    out = tmp_path / "r.json"
    code = main(["run", "--benchmark", "split-digits", "--mode", "class", "--model", TINY, "--weights", str(path),
                 "--freeze", "all", "--epochs", "1", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["config"]["weights"] == str(path) and rec["model"]["freeze"] == "all"


def test_encoder_resizes_and_repeats_grey_images():
    vit = ViT(ViTConfig(img_size=16, patch_size=8, in_chans=3, embed_dim=16, depth=1, num_heads=2)).eval()
    model = Pretrained(vit, 3, img_size=16, in_chans=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    x = torch.rand(2, 1, 8, 8)
    up = F.interpolate(x.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", align_corners=False)
    ref = (up - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(model.features.prepare(x), ref, atol=1e-6)


def test_compare_shows_what_each_method_trains_on_a_pretrained_backbone(tiny_weights, tmp_path, capsys,
                                                                        monkeypatch):
    path, _ = tiny_weights
    monkeypatch.chdir(tmp_path)
    code = main(["compare", "--benchmark", "split-digits", "--mode", "class", "--methods", "finetune", "--seeds", "1",
                 "--model", TINY, "--weights", str(path), "--freeze", "all", "--epochs", "1", "--store",
                 str(tmp_path / "s.db")])
    out = capsys.readouterr().out
    assert code == 0
    table = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    header, row = table[0], table[2]
    assert row[header.index("method")] == "finetune"
    assert row[header.index("trainable params")] == "170"  # the head only: 16 x 10 + 10
    assert 0 < float(row[header.index("Ā %")]) <= 100


def test_a_timm_model_retain_does_not_build_needs_timm_and_download_needs_the_hub(tiny_weights, monkeypatch,
                                                                                    tmp_path):
    import sys

    path, _ = tiny_weights
    monkeypatch.setitem(sys.modules, "timm", None)  # timm absent (as beside the CPU torch of CI)
    with pytest.raises(ConfigError, match=r"other timm models need timm: pip install 'retain\[timm\]'"):
        retain.resolve(benchmark="split-digits", arch="timm:resnet50", weights=str(path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"--download of timm weights needs huggingface_hub"):
        retain.resolve(benchmark="split-digits", arch="timm:vit_small_patch16_224", download=True)


def test_retain_models_take_their_own_or_their_features_state_dict(tmp_path):
    torch.manual_seed(0)
    net = build_model("resnet18-reduced", (1, 28, 28), 10)
    save_weights(net.features, tmp_path / "body.safetensors", "resnet18-reduced", (0.5,), (0.5,))
    save_weights(net, tmp_path / "whole.safetensors", "resnet18-reduced", (0.5,), (0.5,))
    x = torch.rand(2, 1, 28, 28)
    expected = net.eval().features((x - 0.5) / 0.5)
    for name in ("body", "whole"):
        model, _ = backbones.build("resnet18-reduced", str(tmp_path / f"{name}.safetensors"), False, (1, 28, 28), 4)
        assert torch.allclose(model.eval().features(x), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="does not fit --model resnet32"):
        backbones.build("resnet32", str(tmp_path / "body.safetensors"), False, (1, 28, 28), 4)


def test_download_is_made_when_the_run_builds_its_model_not_when_it_is_resolved(tiny_weights, monkeypatch,
                                                                                  tmp_path):
    import sys
    import types

    path, _ = tiny_weights
    calls = []

    def hf_hub_download(repo, filename, cache_dir):
        calls.append((repo, filename))
        return str(path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    run = retain.resolve(benchmark="split-digits", mode="class", arch=TINY, download=True)
    assert calls == []  # resolving checks, and fetches nothing
    model = run.build_model(run.build_scenario())
    assert calls == [("timm/vit_tiny_patch16_224", "model.safetensors")]
    assert model.pretrained["source"] == "download"
