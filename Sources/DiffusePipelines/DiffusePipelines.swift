// DiffusePipelines: see DESIGN.md
