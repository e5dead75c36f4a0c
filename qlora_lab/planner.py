"""The memory planner: pick a model, method and settings; see the stack and which GPUs it fits.

`plan(...)` is the plain function (tests call it); `planner_widget()` is a thin ipywidgets.interact
over it that redraws the stacked bar."""
from .memory import GPU_BUDGETS, LLAMA_PRESETS, OPTIMIZERS, MemoryStack, bundled_config, estimate_memory

MODELS = ("bundled (SmolLM2-135M)",) + tuple(LLAMA_PRESETS)


def _config(model: str):
    if model == MODELS[0]:
        return bundled_config()
    if model in LLAMA_PRESETS:
        return model
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")


def plan(model: str = "7b", method: str = "qlora", seq_len: int = 512, batch_size: int = 1, r: int = 64,
         gradient_checkpointing: bool = True, optimizer: str = "paged_adamw_32bit",
         compute_dtype: str = "bfloat16") -> tuple[MemoryStack, list[str]]:
    """(the estimated stack, names of the GPUs of GPU_BUDGETS whose memory holds its on-device part)."""
    stack = estimate_memory(_config(model), method=method, batch_size=batch_size, seq_len=seq_len, r=r,
                            optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                            compute_dtype=compute_dtype)
    return stack, [name for name, limit in GPU_BUDGETS.items() if stack.fits(limit)]


def describe(stack: MemoryStack, fits: list[str]) -> str:
    gb = stack.device_total / 1e9
    where = ", ".join(fits) if fits else "none of " + ", ".join(GPU_BUDGETS)
    return f"{gb:.1f} GB on the device ({stack.total / 1e9:.1f} GB in all) -> fits on: {where}"


def planner_widget():
    """Sliders and menus that redraw the stacked bar of `plan(...)` and say where it fits."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from .plots import memory_stack_bar

    def show(model, method, seq_len, batch_size, r, gradient_checkpointing, optimizer):
        stack, fits = plan(model, method, seq_len, batch_size, r, gradient_checkpointing, optimizer)
        print(describe(stack, fits))
        fig = memory_stack_bar([stack], title=f"{model}: {stack.label}")
        display(fig)
        plt.close(fig)

    return w.interact(
        show,
        model=w.Dropdown(options=MODELS, value="7b", description="model"),
        method=w.ToggleButtons(options=["full", "lora", "qlora"], value="qlora", description="method"),
        seq_len=w.IntSlider(value=512, min=128, max=4096, step=128, description="seq len"),
        batch_size=w.IntSlider(value=1, min=1, max=16, description="batch"),
        r=w.IntSlider(value=64, min=4, max=256, step=4, description="LoRA r"),
        gradient_checkpointing=w.Checkbox(value=True, description="checkpointing"),
        optimizer=w.Dropdown(options=OPTIMIZERS, value="paged_adamw_32bit", description="optimizer"),
    )
