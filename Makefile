# The two commands of the README, plus helpers for authors.
.PHONY: book test setup lock execute clean

book:            ## set everything up and build the HTML book into _build/html
	bash scripts/build_book.sh

test:            ## set everything up and run every test
	bash scripts/test.sh

setup:
	bash scripts/setup.sh

lock:            ## refresh requirements.lock and scripts/vendor/package-lock.json (UPGRADE=1: newest allowed releases)
	UPGRADE=$(UPGRADE) bash scripts/lock.sh

execute:         ## re-execute one chapter in place: make execute NB=book/01_toy_simulator.ipynb
	MTLBOOK_DATA=$${MTLBOOK_DATA:-$(CURDIR)/../shared/data} MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/jupyter nbconvert --to notebook --execute --inplace \
	  --ExecutePreprocessor.timeout=600 $(NB)

clean:
	rm -rf _build
