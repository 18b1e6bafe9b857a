// DiffuseSchedulers: see DESIGN.md
