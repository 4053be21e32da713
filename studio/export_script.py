"""Generate with an exported PersonaMagic Studio concept in plain diffusers (docs/EXPORT.md in the studio).

Copied into every export bundle as diffusers/generate.py; it needs only diffusers, transformers,
safetensors and torch. The bundle's export.json lists the segments: which embedding (or the
super-category word) the person is at each timestep. The embeddings load with
``load_textual_inversion``; ``callback_on_step_end`` gives each next step its segment's prompt
embeddings.

    python diffusers/generate.py --model runwayml/stable-diffusion-v1-5 --prompt "a photo of {} as a chef" --out chef.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parent.parent


def read_plan(bundle: Path = BUNDLE) -> dict:
    """The bundle's export.json: name, super_category, segments [{embedding, t_low, t_high}, ...]."""
    return json.loads((bundle / "export.json").read_text())


def segment_of(plan: dict, timestep: float) -> int:
    """Index of the segment whose timestep interval holds ``timestep``."""
    for index, segment in enumerate(plan["segments"]):
        if segment["t_low"] <= float(timestep) <= segment["t_high"]:
            return index
    raise ValueError(f"no segment covers timestep {timestep}")


def load_embeddings(pipe, plan: dict, bundle: Path = BUNDLE) -> None:
    """Add every segment's embedding to the pipeline's tokenizer/text encoder (once)."""
    vocabulary = pipe.tokenizer.get_vocab()
    for segment in plan["segments"]:
        name = segment["embedding"]
        if name and name not in vocabulary:
            pipe.load_textual_inversion(str(bundle / "embeddings" / f"{name}.safetensors"), token=name)


def generate(pipe, prompt: str, *, plan: dict | None = None, bundle: Path = BUNDLE, negative_prompt: str = "",
             num_inference_steps: int = 30, guidance_scale: float = 7.5, seed: int = 0,
             height: int | None = None, width: int | None = None):
    """One image of ``prompt`` ({} = the person), the text switching per segment. Returns a PIL image."""
    plan = plan or read_plan(bundle)
    load_embeddings(pipe, plan, bundle)
    do_cfg = guidance_scale > 1.0
    device = pipe._execution_device
    # 1. Prompt embeddings of every segment, [negative ; positive] as the pipeline batches them.
    per_segment, first = [], None
    for segment in plan["segments"]:
        text = prompt.replace("{}", segment["embedding"] or plan["super_category"])
        positive, negative = pipe.encode_prompt(text, device, 1, do_cfg, negative_prompt)
        per_segment.append((positive, negative))
    batched = [torch.cat([n, p]) if do_cfg else p for p, n in per_segment]
    # 2. The first step's segment, from the timesteps the pipeline's scheduler will use.
    probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
    probe.set_timesteps(num_inference_steps, device=device)
    first = segment_of(plan, probe.timesteps[0])

    # 3. After step i, hand step i + 1 the embeddings of its segment.
    def next_segment(pipeline, i, t, callback_kwargs):
        timesteps = pipeline.scheduler.timesteps
        if i + 1 < len(timesteps):
            callback_kwargs["prompt_embeds"] = batched[segment_of(plan, timesteps[i + 1])]
        return callback_kwargs

    positive, negative = per_segment[first]
    result = pipe(
        prompt_embeds=positive, negative_prompt_embeds=negative if do_cfg else None,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=next_segment, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    return result.images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate with an exported PersonaMagic Studio concept.")
    parser.add_argument("--model", default="runwayml/stable-diffusion-v1-5", help="an SD 1.x hub id or folder")
    parser.add_argument("--prompt", default="a photo of {}", help="{} stands for the person")
    parser.add_argument("--negative", default="monochrome, lowres, bad anatomy, worst quality, low quality")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out.png")
    args = parser.parse_args()
    if "{}" not in args.prompt:
        parser.error("the prompt needs {} where the person goes")
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    image = generate(pipe, args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, seed=args.seed)
    image.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
