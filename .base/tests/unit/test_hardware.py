"""GPU catalog, --gpus / --host-mem parsing, host memory and the NVML probe."""
import pytest

from llmqgen.hardware.catalog import GPUS, NVML_NAMES, match_nvml_name, resolve_gpu
from llmqgen.hardware.host import NO_DRIVER, DetectedGpu, _visible, detect_host_memory, detected_gpus
from llmqgen.hardware.inventory import from_detected, parse_bytes, parse_inventory

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize("alias,key", [
    ("3090", "3090"), ("4060ti", "4060ti"), ("4060ti16", "4060ti"), ("4060 Ti 16GB", "4060ti"),
    ("4070tis", "4070tis"), ("4070 Ti Super", "4070tis"), ("4080", "4080"), ("4090", "4090"),
    ("rtx4090", "4090"), ("rtx-4090", "4090"), ("RTX 4090", "4090"), ("NVIDIA GeForce RTX 4090", "4090"),
    ("5080", "5080"), ("5090", "5090"), ("6000ada", "6000ada"), ("RTX 6000 Ada", "6000ada"),
    ("pro6000", "pro6000"), ("RTX PRO 6000", "pro6000"), ("l4", "l4"), ("L40S", "l40s"),
    ("a100-40", "a100-40"), ("a100-80", "a100-80"), ("a100", "a100-80"), ("A100 80GB", "a100-80"),
    ("h100-pcie", "h100-pcie"), ("h100", "h100"), ("h100-sxm", "h100"), ("H200", "h200"), ("b200", "b200")])
def test_resolve_gpu_aliases(alias, key):
    assert resolve_gpu(alias) is GPUS[key]


def test_unknown_gpu_lists_closest():
    with pytest.raises(ValueError, match=r"did you mean 4090"):
        resolve_gpu("4091")


def test_every_arch():
    assert {k: g.arch for k, g in GPUS.items()} == {
        "3090": "sm_86", "4060ti": "sm_89", "4070tis": "sm_89", "4080": "sm_89", "4090": "sm_89",
        "5080": "sm_120", "5090": "sm_120", "6000ada": "sm_89", "pro6000": "sm_120", "l4": "sm_89",
        "l40s": "sm_89", "a100-40": "sm_80", "a100-80": "sm_80", "h100-pcie": "sm_90", "h100": "sm_90",
        "h200": "sm_90", "b200": "sm_100"}


def test_dense_fp32_accumulate_rates():
    g = GPUS["4090"]  # GeForce: FP32 accumulation at half the FP16-accumulate rate (330 / 660)
    assert (round(g.bf16_tflops), round(g.fp8_tflops)) == (165, 330)
    for k in ("h100", "h200"):
        assert (round(GPUS[k].bf16_tflops), round(GPUS[k].fp8_tflops)) == (989, 1979)
    assert GPUS["3090"].fp8_tflops is None and GPUS["a100-80"].fp8_tflops is None
    for g in GPUS.values():   # FP8 tensor math is twice BF16 on every FP8 GPU of the catalog
        if g.fp8_tflops is not None:
            assert g.fp8_tflops == pytest.approx(2 * g.bf16_tflops, rel=0.02), g.name


def test_shared_memory_per_arch():
    smem = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_120": 101376, "sm_90": 232448,
            "sm_100": 232448}
    assert all(g.max_smem_per_block == smem[g.arch] for g in GPUS.values())


def test_links_and_flags():
    assert (GPUS["4060ti"].pcie_gen, GPUS["4060ti"].pcie_lanes) == (4, 8)
    assert GPUS["5090"].pcie_gen == 5
    with_nvlink = {k for k, g in GPUS.items() if g.nvlink_gbs > 0}
    assert with_nvlink == {"3090", "a100-40", "a100-80", "h100", "h200", "b200"}
    assert GPUS["3090"].nvlink_gbs == pytest.approx(56, abs=0.5)
    for k in ("4060ti", "4070tis", "4080", "4090", "5080", "5090"):
        assert GPUS[k].consumer and not GPUS[k].peer_access
    for k in ("l4", "l40s", "a100-40", "a100-80", "h100-pcie", "h100", "h200", "b200"):
        assert GPUS[k].peer_access and not GPUS[k].consumer


def test_memory_is_what_the_driver_reports():
    assert GPUS["4090"].memory_bytes == 24564 * MiB == 25_757_220_864
    assert GPUS["h200"].memory_bytes == 143771 * MiB
    assert GPUS["a100-80"].memory_bytes == 80 * GiB
    assert GPUS["4060ti"].memory_bytes < 16 * GiB   # plan with what the card has, not its label


@pytest.mark.parametrize("nvml,key", [
    ("NVIDIA GeForce RTX 4090", "4090"), ("NVIDIA GeForce RTX 4060 Ti", "4060ti"),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", "4070tis"), ("NVIDIA H200", "h200"),
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA A100-SXM4-40GB", "a100-40"),
    ("NVIDIA A100 80GB PCIe", "a100-80"), ("NVIDIA RTX 6000 Ada Generation", "6000ada"),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "pro6000"), ("NVIDIA L4", "l4"), ("NVIDIA B200", "b200")])
def test_nvml_names(nvml, key):
    assert match_nvml_name(nvml) is GPUS[key]


def test_display_names_are_nvml_names():
    assert all(match_nvml_name(g.display_name) is g for g in GPUS.values())
    assert set(NVML_NAMES.values()) == set(GPUS)


def test_other_products_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'NVIDIA GeForce RTX 4090 D' is not in the catalog.*closest: 4090"):
        match_nvml_name("NVIDIA GeForce RTX 4090 D")


# --- sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,n", [
    ("128G", 128 * GiB), ("128GiB", 128 * GiB), ("128g", 128 * GiB), ("64GB", 64 * 10**9),
    ("512M", 512 * MiB), ("512MiB", 512 * MiB), ("2T", 2 * 2**40), ("1TB", 10**12), ("1.5G", 3 * GiB // 2),
    ("4K", 4096), (" 8 GiB ", 8 * GiB), (12345, 12345)])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["", "G", "GiB", "12X", "-5", "1.2.3", "five", -1, 1.5, True])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


@pytest.mark.parametrize("bare", ["64", "4096", "100B", "1.5"])
def test_parse_bytes_needs_a_unit(bare):
    """A bare "64" would be 64 bytes of host RAM: refused, naming the unit to add."""
    with pytest.raises(ValueError, match="has no unit.*e.g. [0-9.]+G"):
        parse_bytes(bare)
    with pytest.raises(ValueError, match="^--host-mem"):
        parse_inventory("1x4090", host_mem=bare)


# --- inventories ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,count,key", [
    ("4x4090", 4, "4090"), ("1xH200", 1, "h200"), ("2x3090", 2, "3090"), ("8xh100", 8, "h100"),
    ("h200", 1, "h200"), ("4X RTX-4090", 4, "4090"), ("2 x 4060ti16", 2, "4060ti"), ("1xa100", 1, "a100-80")])
def test_parse_inventory(text, count, key):
    inv = parse_inventory(text, host_mem="256G")
    assert (inv.count, inv.gpu) == (count, GPUS[key])
    assert (inv.host_mem_bytes, inv.host_mem_source) == (256 * GiB, "user")
    assert inv.label == f"{count}x{key}"


def test_host_memory_detected_when_not_given():
    inv = parse_inventory("1x4090")
    assert inv.host_mem_source == "detected" and inv.host_mem_bytes == detect_host_memory() > 0


@pytest.mark.parametrize("bad,match", [("0x4090", "at least 1"), ("4x4091", "did you mean 4090"),
                                       ("", "not understood")])
def test_parse_inventory_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_inventory(bad, host_mem=0)


def test_auto_without_a_driver_says_what_to_do():
    try:
        gpus = detected_gpus()
    except ValueError as e:
        assert str(e) == NO_DRIVER
        with pytest.raises(ValueError, match="name the GPUs, e.g. --gpus 1x4090"):
            parse_inventory("auto")
        return
    pytest.skip(f"this machine has a driver ({len(gpus)} GPUs): the no-driver message cannot occur")


def test_auto_with_a_driver_matches_the_catalog():
    try:
        gpus = detected_gpus()
    except ValueError:
        pytest.skip("no NVIDIA driver on this machine")
    inv = parse_inventory("auto", host_mem="64G")
    assert inv.count == len(gpus) and inv.gpu.memory_bytes == min(g.memory_bytes for g in gpus)
    assert inv.gpu.name == match_nvml_name(gpus[0].name).name


def _gpu(name, mib, uuid):
    return DetectedGpu(name, mib * MiB, uuid)


def test_from_detected_counts_and_keeps_the_driver_total():
    spec, n = from_detected([_gpu("NVIDIA GeForce RTX 4090", 24564, "GPU-a")] * 4)
    assert (spec.name, n, spec.memory_bytes) == ("4090", 4, 24564 * MiB)
    spec, _ = from_detected([_gpu("NVIDIA GeForce RTX 4060 Ti", 8188, "GPU-a")])  # the 8 GB variant
    assert spec.memory_bytes == 8188 * MiB and spec.bf16_tflops == GPUS["4060ti"].bf16_tflops


def test_from_detected_refuses_mixed_models_and_none():
    with pytest.raises(ValueError, match="mixed GPU models"):
        from_detected([_gpu("NVIDIA GeForce RTX 4090", 24564, "GPU-a"),
                       _gpu("NVIDIA GeForce RTX 3090", 24576, "GPU-b")])
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        from_detected([])


def test_cuda_visible_devices(monkeypatch):
    gpus = [_gpu("NVIDIA H200", 143771, f"GPU-{i}aaaa") for i in range(4)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible(gpus) == gpus
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert _visible(gpus) == [gpus[2], gpus[0]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3,1,7,0")   # CUDA stops at the invalid 7
    assert _visible(gpus) == [gpus[3], gpus[1]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _visible(gpus) == []


def test_detect_host_memory_is_plausible():
    n = detect_host_memory()
    assert 256 * MiB < n < 64 * 2**40
