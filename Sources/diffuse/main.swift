import DiffusePipelines
print("diffuse")
