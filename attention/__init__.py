"""Pure torch math of every method in the pack: no ComfyUI imports, testable alone."""
