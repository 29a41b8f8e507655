# Container images (needs a Docker engine). Local set-up and tests do not use make: see README.md.
REGISTRY ?= localhost:5000/amft
TAG ?= dev

.PHONY: images push
images:
	docker build -f docker/Dockerfile.cpu -t $(REGISTRY)/amft-pipeline:cpu-$(TAG) .
	docker build -f docker/Dockerfile.cuda -t $(REGISTRY)/amft-pipeline:cuda-$(TAG) .

push: images
	docker push $(REGISTRY)/amft-pipeline:cpu-$(TAG)
	docker push $(REGISTRY)/amft-pipeline:cuda-$(TAG)
