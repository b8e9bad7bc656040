r"""Image-caption datasets built from labelled images, for CPU-sized demos.

`fashion_mnist_captions` pairs every Fashion-MNIST image with five captions
written from its class: a caption template ("a photo of a {}.", "a {} on a
plain background.", ...) filled with one of the class's names ("sneaker",
"trainer", "running shoe"). The words differ between captions of one class,
so the text tower has to learn that synonyms mean the same thing; nothing
but the class is in the text, so a caption never identifies its own image.
Build it like any other dataset (it prepares `fashion_mnist` first if
needed):

  python -m mrl_jax.data.prepare --dataset=fashion_mnist_captions

Features: `image` (28x28x1, as fashion_mnist), `label` (the same ClassLabel),
`captions` (a sequence of 5 strings). Splits and example order are
fashion_mnist's. Captions are a pure function of (split, index), so two
builds are identical.

`ZERO_SHOT_CLASS_NAMES` / `ZERO_SHOT_TEMPLATES` are the prompts the demo's
zero-shot evaluator uses: one plain name per class and templates that also
occur in training (as CLIP's prompts resemble alt-text).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

# Names each Fashion-MNIST class may be called by in a caption.
FASHION_MNIST_SYNONYMS = (
    ('t-shirt', 'top', 'tee'),
    ('trousers', 'pair of trousers', 'pants'),
    ('pullover', 'sweater', 'jumper'),
    ('dress', 'gown', 'frock'),
    ('coat', 'jacket', 'overcoat'),
    ('sandal', 'summer sandal', 'open shoe'),
    ('shirt', 'button-up shirt', 'blouse'),
    ('sneaker', 'trainer', 'running shoe'),
    ('bag', 'handbag', 'purse'),
    ('ankle boot', 'boot', 'short boot'),
)

CAPTION_TEMPLATES = (
    'a photo of a {}.',
    'a {} on a plain background.',
    'a grayscale picture of a {}.',
    'a low resolution photo of the {}.',
    'a catalogue image of a {}.',
    'this is a {}.',
    'a small picture of a {}.',
    'product shot: {}',
)

ZERO_SHOT_CLASS_NAMES = tuple(names[0] for names in FASHION_MNIST_SYNONYMS)
ZERO_SHOT_TEMPLATES = ('a photo of a {}.', 'a {} on a plain background.',
                       'a catalogue image of a {}.')

CAPTIONS_PER_IMAGE = 5


def class_captions(label: int, key: str, num: int = CAPTIONS_PER_IMAGE) -> list[str]:
  """`num` distinct captions of class `label`, chosen by a hash of `key`."""
  seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'little')
  rng = np.random.default_rng(seed)
  synonyms = FASHION_MNIST_SYNONYMS[label]
  pairs = [(t, s) for t in range(len(CAPTION_TEMPLATES)) for s in range(len(synonyms))]
  chosen = rng.choice(len(pairs), size=num, replace=False)
  return [CAPTION_TEMPLATES[pairs[c][0]].format(synonyms[pairs[c][1]]) for c in chosen]


class FashionMnistCaptions(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST images, each with 5 captions written from its class."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(
                names=['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                       'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']),
            'captions': tfds.features.Sequence(tfds.features.Text()),
        }),
        supervised_keys=('image', 'captions'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        disable_shuffling=True,  # keep fashion_mnist's order
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    # Imported here: prepare imports this module to register the builder.
    from mrl_jax.data import prepare  # pylint: disable=g-import-not-at-top
    root = self._data_dir_root
    prepare.prepare('fashion_mnist', root)
    return {split: self._generate_examples(root, split) for split in ('train', 'test')}

  def _generate_examples(self, root, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # The PNG bytes are copied as they are: no decode / re-encode.
    source = tfds.data_source(
        'fashion_mnist', data_dir=root, split=split, download=False,
        decoders={'image': tfds.decode.SkipDecoding()})
    for index in range(len(source)):
      record = source[index]
      label = int(record['label'])
      yield index, {
          'image': record['image'],
          'label': label,
          'captions': class_captions(label, f'{split}/{index}'),
      }


# The WordPiece vocabulary of the demo: every word of the captions and the
# zero-shot prompts (`demo_vocab()`); tests check the file matches.
DEMO_VOCAB_PATH = str(epath.Path(__file__).parent / 'vocab' / 'fashion_mnist_captions.txt')


def demo_texts() -> list[str]:
  """Every caption and zero-shot prompt the demo can produce."""
  texts = [t.format(s) for names in FASHION_MNIST_SYNONYMS for s in names
           for t in CAPTION_TEMPLATES]
  texts += [t.format(n) for n in ZERO_SHOT_CLASS_NAMES for t in ZERO_SHOT_TEMPLATES]
  return texts


def demo_vocab() -> list[str]:
  from mrl_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.build_vocab(demo_texts())
