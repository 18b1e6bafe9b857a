// DiffuseModels: see DESIGN.md
