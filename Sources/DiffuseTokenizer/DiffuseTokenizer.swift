// DiffuseTokenizer: see DESIGN.md
