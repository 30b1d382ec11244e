"""Triton Python BLS model ``<family>_labels``: a raw image in, label image and cell table out.

For clients in any language: the whole of ``cellsam-triton segment``'s client side runs here.
Copied by export/labels_repository.py to ``<family>_labels/1/model.py`` with labels_request.py
(the request's checks and outputs), bls_transport.py (the client transport's interface over BLS
calls to ``<family>`` / ``<family>_grid``), bls.py, request_checks.py and contracts.py beside it,
and the client's rule code as the package ``cellsam_triton/`` (copies of the installed modules:
the files the CLI runs, not a re-implementation). That copy is put first on ``sys.path``; the
model refuses to load if ``cellsam_triton`` resolves anywhere else. Needs numpy, scipy and, for
CellSAM's rules, scikit-image in the backend's Python. Config parameter ``family`` (Family JSON).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bls  # noqa: E402
import cellsam_triton  # noqa: E402
import labels_request  # noqa: E402
from bls_transport import BlsTransport  # noqa: E402


class TritonPythonModel(bls.BlsModel):
    kind = "labels model"

    def setup(self, family, parameters):
        package = os.path.dirname(os.path.abspath(cellsam_triton.__file__))
        if os.path.dirname(package) != HERE:
            raise RuntimeError(f"cellsam_triton resolves to {package}, not the copy beside model.py; re-export the model")
        from cellsam_triton.contracts import Family

        self.family = Family.from_json(parameters["family"])  # the package's class, which the rule code reads
        self.transport = BlsTransport(self.family, self.call)
        labels_request.load_rules(self.family)

    def segment(self, inputs):
        return labels_request.answer(inputs, self.family, self.transport)
