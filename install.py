# S-CFG needs nothing beyond what AUTOMATIC1111 WebUI and Forge already install (torch, einops, gradio).
# The WebUI runs this file at startup; it checks instead of installing.
import importlib.util

for _name in ("torch", "einops"):
    if importlib.util.find_spec(_name) is None:
        print(f"[S-CFG] '{_name}' is missing from this WebUI's environment; S-CFG will stay off.")
