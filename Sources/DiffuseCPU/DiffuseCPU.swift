// DiffuseCPU: see DESIGN.md
