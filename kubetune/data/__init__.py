"""Dataset prep: read a raw dataset, render prompt/completion pairs, clean, tokenize, split, write parquet.

- :mod:`~kubetune.data.sources`: where a dataset comes from (bundled, local file or folder, URI, hub id);
- :mod:`~kubetune.data.formats`: which columns hold what (chat, alpaca or prompt/completion format);
- :mod:`~kubetune.data.reading`: reading the rows, with errors that name the file, line and column;
- :mod:`~kubetune.data.render`: each row's prompt/completion text and token ids (see :mod:`kubetune.prompts`);
- :mod:`~kubetune.data.prepare`: cleaning, splitting, writing the parquet files and loading them back.
"""

from kubetune.data.prepare import PrepResult, load_prepared, prepare_dataset

__all__ = ["PrepResult", "load_prepared", "prepare_dataset"]
