"""Small built-in English corpora for the ``"text"`` dataset, written for this project (no download).

They are tiny (a few KB each): enough for a byte-level ``decoder-lm`` to learn spelling and common
words in a smoke test or demo, not to produce fluent text.
"""

from __future__ import annotations

__all__ = ["CORPORA"]

_PROVERBS = """\
A journey of a thousand miles begins with a single step.
Actions speak louder than words.
All that glitters is not gold.
An apple a day keeps the doctor away.
A bird in the hand is worth two in the bush.
A chain is only as strong as its weakest link.
A watched pot never boils.
Better late than never.
Birds of a feather flock together.
Do not count your chickens before they hatch.
Do not put all your eggs in one basket.
Early to bed and early to rise makes a man healthy, wealthy and wise.
Every cloud has a silver lining.
Fortune favours the bold.
Great oaks from little acorns grow.
Haste makes waste.
He who laughs last laughs best.
If at first you do not succeed, try, try again.
It is no use crying over spilt milk.
Knowledge is power.
Laughter is the best medicine.
Let sleeping dogs lie.
Look before you leap.
Many hands make light work.
Necessity is the mother of invention.
No man is an island.
Old habits die hard.
One good turn deserves another.
Practice makes perfect.
Rome was not built in a day.
Slow and steady wins the race.
The early bird catches the worm.
The pen is mightier than the sword.
There is no place like home.
Time and tide wait for no man.
Too many cooks spoil the broth.
Two heads are better than one.
What goes around comes around.
When in Rome, do as the Romans do.
Where there is a will, there is a way.
You can lead a horse to water, but you cannot make it drink.
You cannot judge a book by its cover.
A stitch in time saves nine.
A rolling stone gathers no moss.
Absence makes the heart grow fonder.
Beauty is in the eye of the beholder.
Curiosity killed the cat.
Easy come, easy go.
Honesty is the best policy.
Idle hands are the devil's workshop.
Still waters run deep.
The squeaky wheel gets the grease.
Strike while the iron is hot.
Make hay while the sun shines.
Half a loaf is better than none.
A friend in need is a friend indeed.
Better safe than sorry.
Every dog has its day.
Fools rush in where angels fear to tread.
Hope for the best, prepare for the worst.
"""

_PLATFORM = """\
This platform serves models as a service. A client registers a model, deploys it and sends requests;
the mesh of small services behind the gateway does the rest. Every model is built from a trusted zoo of
architectures, and its weights travel as safetensors, never as code, so that loading a model can never
run a stranger's program.

Training happens close to the data. A job names an architecture, its arguments and a dataset, and the
scheduler checks all three before it accepts the job, because a mistake found at submit time costs a
second while a mistake found after an hour of training costs the hour. When the job runs, each worker
loads the same dataset, takes its own shard of the training samples and computes gradients; the
parameter servers add the gradients up, update the weights and hand the new weights back.

The training set and the validation set never overlap. The validation samples are held out so that the
loss we report measures how well the model does on data it has not seen, not how well it remembers the
data it has. A model that does well on its training data but poorly on its validation data has learnt
the examples rather than the rule.

Every model keeps its lineage: the dataset it was trained on, with a fingerprint of the exact bytes,
the arguments of its architecture, and the seed that split the data. Anyone can later ask where a model
came from and get the same answer, and anyone with the same data and the same seed can train it again.

Small models are cheap to train and quick to test. A tiny language model trained on a few pages of text
will not write poetry, but it learns which letters follow which, where the spaces go and how sentences
end, and that is enough to show that the whole path from data to deployed model works.
"""

#: Built-in corpus name -> text; ``"all"`` (both, about 4 KB) is the default of the ``"text"`` dataset.
CORPORA: dict[str, str] = {"all": _PROVERBS + "\n" + _PLATFORM, "proverbs": _PROVERBS, "platform": _PLATFORM}
