"""The README and docs/: every relative link leads to a file, and every command block is run by a
named test (through ``helpers.readme_block``) or says why it cannot run here."""

import re

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# (page, the heading above the block) -> (the test file that runs it, a string of that file that does),
# or why nothing here can run it.
BLOCKS = {
    ("README.md", "## Quick start"): ("tests/test_demo.py", '"sdjax-demo"'),  # .ci/run is ./run test
    ("README.md", "## Install"): ("tests/test_install.py", '"pip", "install"'),  # the wheel, in a fresh venv
    ("README.md", "## Text to image"): ("tests/test_cli_sample.py", 'readme_block("## Text to image")'),
    ("README.md", "## SDXL with its refiner"): ("tests/test_sdxl.py", 'readme_block("## SDXL with its refiner")'),
    ("README.md", "## Fine-tune on your images"): ("tests/test_lora.py", 'readme_block("## Fine-tune on your images")'),
    ("README.md", "## Train on a pod"): ("tests/test_preemption.py", 'SDJAX_NUM_PROCESSES="2"'),  # its sdjax-train
    ("README.md", "## Evaluate"): ("tests/test_evaluator.py", 'readme_block("## Evaluate")'),
    ("README.md", "## Models and formats"): ("tests/test_readme_inpaint_export.py",
                                            'readme_block("## Models and formats")'),
    ("checkpoints.md", "## Loading"): ("tests/test_stable_diffusion.py", 'params.main(["--preset", "sd15"])'),
    ("checkpoints.md", "## Exporting to diffusers, ComfyUI and A1111"): ("tests/test_readme_inpaint_export.py",
                                                                        '"docs/checkpoints.md"'),
    ("lora.md", "## Training"): ("tests/test_lora.py", '"docs/lora.md"'),
    ("pods.md", "# Pods: every host runs the same command"): ("tests/test_preemption.py", 'SDJAX_NUM_PROCESSES="2"'),
    # sd2_base:tiny with the same flags, on a tiny SD 2 folder and local shards
    ("pods.md", "## Precomputed latents"): ("tests/test_configs.py", '"encode", "--out"'),
    ("pods.md", "## Image folders and TFDS datasets"): ("tests/test_train_latent.py", 'SDJAX_NUM_PROCESSES="2"'),
    ("sampling.md", "## From Python"): ("tests/test_cli_sample.py", '"docs/sampling.md"'),
    ("sampling.md", "## SDXL"): ("tests/test_sdxl.py", 'readme_block("## SDXL", "docs/sampling.md")'),
    ("sampling.md", "## Inpainting"): ("tests/test_readme_inpaint_export.py",
                                       'readme_block("## Inpainting", "docs/sampling.md")'),
    # the tiny config on v5e-8; the SD 1.5 / SD 2 lines compile for minutes (their figures: docs/benchmarks.md)
    ("speed.md", "## Compile for a TPU slice on any host"): ("tests/test_aot.py", "aot.main("),
    # the full-size run takes a minute; the test runs the same main() on two small shards
    ("benchmarks.md", "## The data path: webdataset shards to 512 px batches (measured, CPU)"):
        ("tests/test_benchmarks.py", "data_path.main("),
    ("training.md", "## Training: two phases"): ("tests/test_cli_train.py",
                                                 'readme_block("## Training: two phases", "docs/training.md")'),
    ("training.md", "## Your own captioned images"):
        ("tests/test_own_data.py", 'readme_block("## Your own captioned images", "docs/training.md")'),
    ("evaluation.md", "## FID"): ("tests/test_fid.py", 'readme_block("## FID", "docs/evaluation.md")'),
    ("evaluation.md", "## CLIP score"):
        ("tests/test_clip_score.py", 'readme_block("## CLIP score", "docs/evaluation.md")'),
    ("evaluation.md", "## A model's FID and CLIP score, as MLPerf measures them"):
        ("tests/test_evaluator.py", 'readme_block("## A model\'s FID and CLIP score", "docs/evaluation.md")'),
    ("evaluation.md", "## In training"):
        ("tests/test_evaluator.py", 'readme_block("## In training", "docs/evaluation.md")'),
    ("benchmarks.md", "## The evaluation: its judges on this CPU (measured) and MLPerf's evaluation on a v5p-8 "
                      "(compiler-estimated)"):
        "not run here: a full-size ViT-H-14 in two frameworks takes minutes; its parts (sdjax.evaluation's judges, "
        "tests/eval_reference.py) are tested against the same references",
    ("training.md", "## SDXL: fine-tune and LoRA"):
        ("tests/test_sdxl.py", 'readme_block("## SDXL: fine-tune and LoRA", "docs/training.md")'),
    ("training.md", "## Real Stable Diffusion configs"):
        "not run here: it needs a real SD 1.5 checkpoint; tests/test_configs.py trains its :tiny variant",
}


def _blocks() -> set[tuple[str, str]]:
    found = set()
    for page in PAGES:
        heading, fenced = None, False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                if not fenced and line.startswith("```bash"):
                    found.add((page.name, heading))
                fenced = not fenced
            elif line.startswith("#") and not fenced:
                heading = line
    return found


def test_every_command_block_is_run_by_a_test_or_says_why_not():
    assert _blocks() == set(BLOCKS)
    for block, runner in BLOCKS.items():
        if isinstance(runner, tuple):
            path, marker = runner
            assert marker in (ROOT / path).read_text(), (block, path, marker)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_to_files(page):
    for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_architecture_page_matches_the_tree():
    """docs/architecture.md names every module of the package, and every path it names exists."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p for p in (ROOT / "sdjax").rglob("*.py") if p.name != "__init__.py"]
    assert [str(p.relative_to(ROOT)) for p in modules if f"`{p.name}`" not in text and
            f"`{p.relative_to(ROOT)}`" not in text] == []
    for path in re.findall(r"`((?:sdjax|tests|benchmarks|demo|notebooks|train|sample)/[\w/.]*)`", text):
        assert (ROOT / path).exists(), path
