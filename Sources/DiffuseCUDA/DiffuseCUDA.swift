// DiffuseCUDA: see DESIGN.md
