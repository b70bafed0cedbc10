"""The content of the tiny world: categories, subjects and what can be said about them.

Each subject carries three facts in two registers: a ``gist`` and an ``analogy`` in short,
everyday words (the elementary pole P1A) and a ``technical`` noun phrase made of dense jargon
(the PhD pole P1B). Category-level sentences add detail in both registers. The generator in
:mod:`psoups_ray.world.generator` assembles responses from these pieces; nothing here is random.

The facts are simple and plausible rather than encyclopedic. Keep the simple strings free of
long words (9+ letters) apart from the subject itself: the P1 checker counts them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """One subject of the tiny world.

    ``gist`` completes a sentence that starts with the subject and already agrees with it in
    number ("volcanoes" + "let hot melted rock ..."); ``analogy`` completes "Think of it like
    ..."; ``technical`` is a jargon noun phrase that completes "... is governed by ...".
    """

    subject: str
    category: str
    plural: bool
    gist: str
    analogy: str
    technical: str

    @property
    def pronoun(self) -> str:
        """``them`` for plural subjects, ``it`` otherwise."""
        return "them" if self.plural else "it"


@dataclass(frozen=True)
class Category:
    """A group of subjects sharing question templates and category-level sentences.

    ``questions`` are prompt templates with ``{s}`` (subject), ``{be}`` (is/are) and
    ``{do}`` (does/do); ``field`` names the discipline in the PhD register;
    ``simple_background`` holds lower-case clauses that follow a cue such as "For context,".
    """

    name: str
    field: str
    questions: tuple[str, ...]
    simple_background: tuple[str, ...]
    simple_details: tuple[str, ...]
    technical_details: tuple[str, ...]


_WHAT_HOW_WORK = ("What {be} {s}?", "How {do} {s} work?", "Explain {s}.", "Why {be} {s} important?")

CATEGORIES: tuple[Category, ...] = (
    Category(
        name="earth science",
        field="geophysics",
        questions=("What {be} {s}?", "How {do} {s} form?", "Explain {s}.", "Tell me about {s}."),
        simple_background=(
            "people have studied the land and its rocks for a very long time",
            "long ago, people told stories to explain what shapes the land",
        ),
        simple_details=(
            "The ground may look still, but it is slowly changing all the time.",
            "Water, wind and heat shape the land bit by bit over many years.",
        ),
        technical_details=(
            "Quantitative characterization necessitates integrating heterogeneous geochemical "
            "and stratigraphic observations.",
            "Such phenomena exhibit pronounced spatiotemporal heterogeneity and nonlinear "
            "sensitivity to boundary conditions.",
        ),
    ),
    Category(
        name="weather",
        field="atmospheric physics",
        questions=("What {be} {s}?", "What causes {s}?", "Explain {s}.", "Tell me about {s}."),
        simple_background=(
            "for a very long time, people have watched the sky to guess the weather",
            "long ago, people told stories about the sky to explain storms and rain",
        ),
        simple_details=(
            "Weather is all about air, water and heat from the sun moving around.",
            "The sun warms the air, and warm air rises up into the sky.",
        ),
        technical_details=(
            "Parameterization of turbulent subgrid processes remains the dominant uncertainty "
            "in numerical prediction.",
            "Thermodynamic disequilibrium and stochastic microphysical variability jointly "
            "determine the observable characteristics.",
        ),
    ),
    Category(
        name="astronomy",
        field="astrophysics",
        questions=(
            "What {be} {s}?",
            "Tell me about {s}.",
            "Explain {s}.",
            "Why do scientists study {s}?",
        ),
        simple_background=(
            "people have looked up at the night sky for a very long time",
            "long ago, people used the sky to find their way and to keep track of time",
        ),
        simple_details=(
            "Space is very big, and the things in it are very far apart.",
            "Gravity is the pull that keeps things in space moving along their paths.",
        ),
        technical_details=(
            "Spectroscopic and photometric observations constrain theoretical models across "
            "extraordinary dynamical ranges.",
            "Relativistic corrections and stochastic perturbations complicate otherwise "
            "idealized analytical descriptions.",
        ),
    ),
    Category(
        name="animals",
        field="comparative zoology",
        questions=(
            "What are {s}?",
            "How do {s} live?",
            "Tell me about {s}.",
            "Why are {s} important?",
        ),
        simple_background=(
            "people have watched animals for a very long time to learn how they live",
            "long ago, people drew animals on the walls of caves",
        ),
        simple_details=(
            "Every animal needs food, water and a safe place to live.",
            "Over many, many years, animals slowly change to fit the place where they live.",
        ),
        technical_details=(
            "Comparative phylogenetic analyses indicate convergent evolutionary optimization "
            "under ecological selection pressures.",
            "Individual behavioural variability reflects heterogeneous physiological and "
            "environmental determinants.",
        ),
    ),
    Category(
        name="plants",
        field="plant physiology",
        questions=(
            "What {be} {s}?",
            "How {do} {s} grow?",
            "Explain {s}.",
            "Why {be} {s} important?",
        ),
        simple_background=(
            "people have grown plants for food for a very long time",
            "long ago, people had to learn which plants were safe to eat",
        ),
        simple_details=(
            "Plants need light, water and air to grow.",
            "Plants make their own food, so they do not need to hunt or shop.",
        ),
        technical_details=(
            "Phenotypic plasticity enables physiological acclimation to heterogeneous "
            "environmental conditions.",
            "Comparative phylogenetic evidence indicates repeated evolutionary diversification "
            "of these characteristics.",
        ),
    ),
    Category(
        name="human body",
        field="human physiology",
        questions=(
            "What {do} {s} do?",
            "How {do} {s} work?",
            "Explain {s}.",
            "Why {be} {s} important?",
        ),
        simple_background=(
            "long ago, people did not know much about what goes on inside the body",
            "doctors have been learning about the body for a very long time",
        ),
        simple_details=(
            "Your body is made of tiny parts called cells that work as a team.",
            "Food, water, sleep and play all help your body stay strong.",
        ),
        technical_details=(
            "Homeostatic regulation integrates neuroendocrine signalling with tissue-specific "
            "metabolic requirements.",
            "Pathophysiological perturbations manifest as quantifiable deviations from these "
            "equilibrium dynamics.",
        ),
    ),
    Category(
        name="physics",
        field="experimental physics",
        questions=_WHAT_HOW_WORK,
        simple_background=(
            "long ago, people could only guess why things fall, shine or make noise",
            "people have asked how the world works for a very long time",
        ),
        simple_details=(
            "All the stuff around you is made of tiny bits that push and pull on each other.",
            "Energy can move and change form, but it does not just vanish.",
        ),
        technical_details=(
            "Macroscopic observables emerge from statistical averaging over microscopic degrees "
            "of freedom.",
            "Quantitative predictions necessitate dimensionless characterization of the relevant "
            "physical regime.",
        ),
    ),
    Category(
        name="technology",
        field="engineering science",
        questions=_WHAT_HOW_WORK,
        simple_background=(
            "long ago, people did every job by hand or with the help of animals",
            "each new machine came from people trying out ideas and fixing mistakes",
        ),
        simple_details=(
            "People build machines to do jobs that are hard or slow to do by hand.",
            "Each new machine is built on ideas from older ones.",
        ),
        technical_details=(
            "Engineering optimization involves multiobjective tradeoffs between efficiency, "
            "reliability and manufacturability.",
            "Performance characterization necessitates rigorous verification under stochastic "
            "operational conditions.",
        ),
    ),
    Category(
        name="everyday chemistry",
        field="physical chemistry",
        questions=(
            "What is {s}?",
            "Tell me about {s}.",
            "Explain {s}.",
            "What is the science behind {s}?",
        ),
        simple_background=(
            "people have been mixing and cooking stuff for a very long time",
            "long ago, people learned to use fire, salt and water to make new things",
        ),
        simple_details=(
            "All stuff is made of tiny bits that can join up and split apart.",
            "Heat, water and air can make one kind of stuff turn into another.",
        ),
        technical_details=(
            "Reaction thermodynamics and kinetic barriers jointly determine the macroscopic "
            "observables.",
            "Spectroscopic characterization elucidates the underlying molecular configurations.",
        ),
    ),
)

# (subject, plural, gist, analogy, technical) per category, in the order of CATEGORIES.
# fmt: off
_SUBJECTS: dict[str, tuple[tuple[str, bool, str, str, str], ...]] = {
    "earth science": (
        ("volcanoes", True, "let hot melted rock come up from deep under the ground",
         "a pot of soup that bubbles over when it gets too hot",
         "magmatic decompression, volatile exsolution and lithospheric extension"),
        ("earthquakes", True, "happen when big pieces of the ground slip and shake",
         "a stick that snaps when you bend it too far",
         "elastic strain accumulation and abrupt frictional instability along tectonic faults"),
        ("glaciers", True, "are huge rivers of ice that move very slowly down hills",
         "a giant ice cube that slides a tiny bit each day",
         "viscoplastic deformation of polycrystalline ice and subglacial basal sliding"),
        ("rivers", True, "carry rain water from high land down to the sea",
         "water running down a slide at the park",
         "hydrodynamic sediment transport and catchment-scale precipitation partitioning"),
        ("mountains", True, "grow when big parts of the ground push into each other",
         "a rug that bunches up when you push it against a wall",
         "compressional orogenesis, crustal thickening and isostatic compensation"),
        ("deserts", True, "are dry places that get very little rain",
         "a sponge that was left out in the sun all day",
         "persistent atmospheric subsidence and evaporative hydrological deficits"),
        ("caves", True, "are big holes in rock that water slowly carves out",
         "sugar that melts away when you pour water on it",
         "carbonate dissolution, karstification and speleogenetic evolution"),
        ("islands", True, "are bits of land with water all around them",
         "a rock that pokes out of the water in a bath",
         "volcanic accretion, eustatic oscillation and differential tectonic uplift"),
        ("soil", False, "is a mix of tiny bits of rock, old leaves and small living things",
         "a big cake made from lots of crumbs",
         "pedogenic weathering, organic decomposition and microbial biogeochemical cycling"),
        ("fossils", True,
         "are the stony marks of plants and animals that lived a very long time ago",
         "a footprint in mud that slowly turns hard",
         "taphonomic preservation, permineralization and diagenetic tissue replacement"),
    ),
    "weather": (
        ("rain", False, "is water that falls from clouds when the drops get too heavy",
         "a wet sponge that drips when it gets too full",
         "collision-coalescence of hydrometeors and microphysical condensation processes"),
        ("snow", False, "is made of tiny ice crystals that fall when the air is cold",
         "frost from a cold window floating down from the sky",
         "heterogeneous ice nucleation, vapor deposition and dendritic crystallization"),
        ("thunderstorms", True, "are big storms with rain, wind, thunder and flashes of light",
         "a pot of water that boils and bubbles up very high",
         "convective instability, latent heat release and electrostatic charge separation"),
        ("rainbows", True, "show up when sunlight shines through drops of rain",
         "light going through a glass toy and splitting into colors",
         "wavelength-dependent refraction and internal reflection within spherical droplets"),
        ("clouds", True, "are made of lots of tiny water drops floating in the sky",
         "the puff you see when you breathe out on a cold day",
         "adiabatic cooling, condensation nuclei activation and turbulent entrainment"),
        ("wind", False, "is air that moves from one place to another",
         "air rushing out of a balloon when you let it go",
         "pressure-gradient acceleration, Coriolis deflection and frictional dissipation"),
        ("hurricanes", True, "are huge spinning storms that form over warm sea water",
         "water swirling down a drain, but much, much bigger",
         "warm-core cyclogenesis, enthalpy fluxes and angular momentum conservation"),
        ("fog", False, "is a cloud that sits low, right on the ground",
         "walking around inside a cloud",
         "radiative cooling, advective moisture transport and near-surface saturation"),
        ("hail", False, "is made of balls of ice that grow inside big storms and then fall",
         "a snowball that gets bigger each time it rolls",
         "accretional riming of supercooled droplets within convective updrafts"),
        ("lightning", False, "is a giant spark that jumps between clouds and the ground",
         "the tiny zap you feel after you rub your socks on a rug",
         "electrostatic charge separation, dielectric breakdown and stepped-leader propagation"),
    ),
    "astronomy": (
        ("stars", True, "are giant balls of hot gas that make their own light",
         "a huge campfire far away in the dark",
         "gravitationally confined thermonuclear fusion and radiative energy transport"),
        ("planets", True, "are big round worlds that travel around a star",
         "marbles rolling around and around in a bowl",
         "gravitational accretion within protoplanetary disks and Keplerian orbital dynamics"),
        ("the moon", False, "is a big ball of rock that goes around the earth",
         "a ball on a string that you swing around you",
         "synchronous rotation, tidal interaction and giant-impact formation hypotheses"),
        ("comets", True, "are balls of ice and dust that grow long tails near the sun",
         "a dirty snowball that melts when it gets close to a fire",
         "volatile sublimation, cometary coma formation and nongravitational perturbations"),
        ("black holes", True, "are places where gravity pulls so hard that not even light gets out",
         "a drain that pulls in all that gets too close",
         "relativistic spacetime curvature and accretion-disk luminosity"),
        ("the sun", False,
         "is the star at the middle of our solar system that gives us light and heat",
         "a giant lamp that never gets turned off",
         "hydrostatic equilibrium, thermonuclear hydrogen fusion and magnetohydrodynamic activity"),
        ("eclipses", True, "happen when the moon or the earth blocks the light of the sun",
         "putting your hand in front of a lamp to make a shadow",
         "syzygistic alignment, umbral projection geometry and nodal orbital precession"),
        ("galaxies", True, "are huge groups of stars, gas and dust held together by gravity",
         "a giant city where the stars are the houses",
         "hierarchical structure formation, dark matter halos and stellar population dynamics"),
        ("meteors", True, "are bits of space rock that burn up when they fall into our air",
         "a match that lights up when you strike it fast",
         "hypersonic atmospheric entry, ablation and ionization of meteoroid material"),
        ("satellites", True, "are machines we send up to go around and around the earth",
         "a ball thrown so fast that it keeps falling around the world",
         "orbital mechanics, perturbative station-keeping and telecommunication engineering"),
    ),
    "animals": (
        ("bees", True, "are small flying bugs that live in big groups and make honey from flowers",
         "a busy town where everyone has a job",
         "eusocial colony organization, pheromonal communication and pollination ecology"),
        ("whales", True, "are huge animals that live in the sea but breathe air like we do",
         "a giant swimming bus that has to come up for air",
         "cetacean thermoregulation, echolocation and physiological diving adaptations"),
        ("birds", True, "are animals with feathers and wings, and most of them can fly",
         "a paper plane that can flap its own wings",
         "aerodynamic flight, endothermic metabolism and evolutionary descent from theropods"),
        ("ants", True, "are tiny bugs that live in big groups and work together",
         "a big team where each player knows their part",
         "eusocial caste differentiation, stigmergic coordination and chemical communication"),
        ("frogs", True, "start life as tadpoles in water and grow legs as they get older",
         "a toy that changes shape as you play with it",
         "amphibian metamorphosis, cutaneous respiration and thyroid-regulated development"),
        ("butterflies", True,
         "start out as little crawling bugs and then change into bugs with bright wings",
         "a kid who goes to sleep in a bag and wakes up with wings",
         "holometabolous metamorphosis and pupal tissue reorganization"),
        ("bats", True, "are furry animals that fly at night and find their way with sound",
         "shouting in a cave and listening for the echo",
         "laryngeal echolocation, nocturnal foraging ecology and chiropteran biomechanics"),
        ("sharks", True,
         "are fast fish with sharp teeth that have lived in the sea for a very long time",
         "a fast boat that can smell food from far away",
         "cartilaginous skeletal architecture, electroreception and chondrichthyan morphology"),
        ("penguins", True, "are birds that cannot fly but swim very well in cold seas",
         "a bird in a warm coat that uses its wings as paddles",
         "thermoregulatory adaptation, hydrodynamic locomotion and colonial breeding"),
        ("octopuses", True, "are soft sea animals with eight arms and a very smart brain",
         "a squishy ball with eight clever hands",
         "distributed neural architecture, chromatophore camouflage and cephalopod cognition"),
    ),
    "plants": (
        ("trees", True, "are tall plants with wooden trunks that can live for many years",
         "a tall straw that pulls water up from the ground",
         "secondary xylem formation, transpiration-driven hydraulic conductance and carbon "
         "sequestration"),
        ("flowers", True, "are the bright parts of plants that help them make seeds",
         "a sign that says come here to the bees",
         "angiosperm reproductive morphology and pollinator-mediated fertilization"),
        ("seeds", True, "are tiny packs that hold a baby plant and its first food",
         "a lunch box with a sleeping plant inside",
         "embryonic dormancy, endosperm mobilization and germination physiology"),
        ("leaves", True, "are the flat green parts of a plant that make food from sunlight",
         "a tiny kitchen that cooks with light",
         "photosynthetic carbon fixation, stomatal regulation and chlorophyll excitation"),
        ("mushrooms", True,
         "are the parts of a fungus that pop up above the ground to spread spores",
         "an apple on a tree, where the real tree hides under the ground",
         "fungal sporocarp development, saprotrophic nutrition and mycelial expansion"),
        ("cactuses", True,
         "are plants that keep water in their thick stems so they can live in dry places",
         "a water bottle with spikes on the outside",
         "crassulacean acid metabolism and xerophytic morphological adaptation"),
        ("moss", False, "is a small soft plant that grows in damp, shady spots",
         "a green carpet that likes to stay wet",
         "poikilohydric desiccation tolerance and gametophyte-dominated reproduction"),
        ("grass", False, "is a plant with thin leaves that grows back even after it is cut",
         "hair that keeps on growing after a haircut",
         "basal meristematic regeneration and graminoid ecological dominance"),
        ("roots", True,
         "are the parts of a plant under the ground that drink water and hold it in place",
         "a straw and an anchor at the same time",
         "rhizosphere interactions, mycorrhizal symbiosis and nutrient uptake kinetics"),
        ("bamboo", False, "is a very fast growing grass with tall, hollow stems",
         "a stack of hollow pipes that keeps getting taller",
         "internodal elongation, rhizomatous clonal propagation and lignified culm mechanics"),
    ),
    "human body": (
        ("the heart", False, "is a strong muscle that pumps blood all around your body",
         "a water pump that never takes a break",
         "myocardial contractility, electrophysiological pacemaker activity and hemodynamics"),
        ("lungs", True, "bring fresh air into your body and push old air back out",
         "two balloons that fill up and let go with each breath",
         "alveolar gas exchange, pulmonary ventilation and surfactant-mediated compliance"),
        ("bones", True, "are the hard parts inside your body that hold you up and keep you safe",
         "the frame that holds up a house",
         "osteoblastic remodeling, hydroxyapatite mineralization and hematopoietic function"),
        ("muscles", True, "pull on your bones so you can move, run and jump",
         "ropes that pull on a puppet",
         "sarcomeric actomyosin interactions, excitation-contraction coupling and neuromuscular "
         "recruitment"),
        ("the brain", False, "is the part of you that thinks, feels and tells your body what to do",
         "the boss of a big team",
         "synaptic plasticity, distributed neural computation and neuromodulatory signalling"),
        ("blood", False, "carries food and air to every part of your body and takes waste away",
         "a truck that drives all over town to drop things off",
         "erythrocyte oxygen transport, plasma homeostasis and immunological surveillance"),
        ("teeth", True, "are hard parts in your mouth that bite and chew your food",
         "little tools for cutting and crushing",
         "enamel biomineralization, dentin microstructure and periodontal biomechanics"),
        ("skin", False, "covers your whole body and keeps germs out and water in",
         "a raincoat that fixes itself when it gets a hole",
         "epidermal keratinization, lipid barrier organization and cutaneous immunology"),
        ("sleep", False, "is the time when your body rests and your brain sorts out the day",
         "putting your toys back on the shelf at the end of the day",
         "circadian regulation, homeostatic sleep pressure and thalamocortical oscillations"),
        ("the stomach", False, "is a stretchy bag in your belly that mashes up your food",
         "a blender that mixes food with juice",
         "gastric acid secretion, proteolytic enzyme activation and peristaltic motility"),
    ),
    "physics": (
        ("magnets", True, "pull on some metals and push or pull on other magnets",
         "hands you cannot see that reach out and grab",
         "ferromagnetic domain alignment, exchange interactions and magnetostatic energy"),
        ("gravity", False, "is the pull that makes things fall down and keeps us on the ground",
         "a rope you cannot see that ties you to the earth",
         "spacetime curvature and Newtonian gravitational attraction"),
        ("sound", False, "is made when things shake and send waves through the air to your ears",
         "ripples that spread out when you drop a stone in a pond",
         "longitudinal pressure oscillations, acoustic impedance and frequency-dependent "
         "attenuation"),
        ("light", False, "is a kind of energy that lets us see and moves faster than anything else",
         "a super fast runner that never gets tired",
         "electromagnetic radiation, wave-particle duality and quantized photon energy"),
        ("heat", False, "is energy that moves from warm things to cold things",
         "warm water spreading out into a cold bath",
         "thermodynamic energy transfer, conduction, convection and radiative equilibrium"),
        ("electricity", False, "is the flow of tiny charged bits that makes lights and toys work",
         "water flowing through a hose",
         "electron transport, electrochemical potential differences and ohmic resistance"),
        ("friction", False, "is the rub between two things that slows them down",
         "trying to slide on a rug instead of on ice",
         "microscopic asperity contact, adhesive interactions and interfacial dissipation"),
        ("mirrors", True, "are smooth, shiny surfaces that bounce light back to your eyes",
         "a ball bouncing straight back off a wall",
         "specular reflection, metallic conduction electrons and geometric optical imaging"),
        ("echoes", True, "are sounds that bounce off a wall and come back to you",
         "throwing a ball at a wall and catching it again",
         "acoustic reflection, propagation delay and interference phenomena"),
        ("waves", True, "carry energy from one place to another by moving up and down",
         "people in a crowd standing up and sitting down in turn",
         "periodic oscillatory propagation, dispersion relations and linear superposition"),
    ),
    "technology": (
        ("computers", True, "are machines that follow steps very fast to solve problems",
         "a super fast helper that follows a recipe",
         "algorithmic computation, transistor-level logic and hierarchical memory architectures"),
        ("bridges", True, "let people and cars cross over rivers and roads",
         "a plank laid over a puddle so you can walk across",
         "structural load distribution, viscoelastic stress concentration and cyclic fatigue "
         "accumulation"),
        ("batteries", True, "store energy and give it out to power things like phones and toys",
         "a lunch box of energy that you can take with you",
         "electrochemical redox reactions, ionic conductivity and electrode kinetics"),
        ("airplanes", True, "fly because their wings push air down and the air pushes them up",
         "holding your hand out of a car window and feeling it lift",
         "aerodynamic lift generation, pressure differentials and turbofan propulsion"),
        ("rockets", True, "go up by pushing hot gas out the back very fast",
         "a balloon that zooms away when you let go of it",
         "momentum conservation, combustion thermochemistry and specific impulse optimization"),
        ("telescopes", True, "use lenses or mirrors to help us see things that are very far away",
         "a giant eye that collects lots of light",
         "optical aperture synthesis, diffraction-limited resolution and photometric sensitivity"),
        ("the internet", False, "is a huge web of computers that send messages to each other",
         "a giant mail system that works in the blink of an eye",
         "packet-switched networking, hierarchical routing protocols and distributed "
         "infrastructure"),
        ("robots", True, "are machines that can sense things around them and move on their own",
         "a toy that knows what to do without you",
         "sensorimotor control, probabilistic state estimation and trajectory optimization"),
        ("engines", True, "burn fuel or use power to make things move",
         "a bike that someone else pedals for you",
         "thermodynamic cycles, combustion efficiency and mechanical power transmission"),
        ("solar panels", True, "turn sunlight into power we can use at home",
         "a leaf that makes power instead of food",
         "photovoltaic charge separation, semiconductor bandgap engineering and conversion "
         "efficiency"),
    ),
    "everyday chemistry": (
        ("soap", False, "grabs dirt and grease so water can wash them away",
         "a tiny hand that holds dirt with one end and water with the other",
         "amphiphilic surfactant molecules, micelle formation and interfacial tension"),
        ("rust", False, "is what forms when iron meets water and air for a long time",
         "iron slowly putting on a brown, flaky coat",
         "electrochemical oxidation, hydrated ferric oxide formation and corrosion kinetics"),
        ("ice", False, "is water that got so cold that it turned hard",
         "water that stops dancing and holds still",
         "hydrogen-bonded crystalline lattices, nucleation thermodynamics and density anomalies"),
        ("fire", False, "is what you see when fuel burns fast in air and gives off heat and light",
         "a hungry animal that eats wood and breathes air",
         "exothermic combustion, radical chain reactions and flame thermochemistry"),
        ("bread", False, "rises because tiny living things in the dough make little bubbles of gas",
         "blowing up lots of tiny balloons inside the dough",
         "yeast fermentation, carbon dioxide production and gluten viscoelasticity"),
        ("salt", False, "is made of tiny crystals that make food taste better and keep it fresh",
         "tiny cubes that melt away in water",
         "ionic crystal lattices, electrolyte dissociation and osmotic preservation"),
        ("glass", False,
         "is made by melting sand until it is hot and runny and then letting it cool",
         "candy that cools into a clear, hard sheet",
         "amorphous silicate networks, glass transition thermodynamics and vitrification"),
        ("paper", False, "is made from tiny bits of wood pressed into thin sheets",
         "a mat woven from very tiny threads",
         "cellulose fiber networks, intermolecular hydrogen bonding and lignin extraction"),
        ("plastic", False,
         "is a material made of long chains that can be shaped into almost any form",
         "a long chain of paper clips linked together",
         "synthetic polymerization, macromolecular entanglement and thermoplastic processing"),
        ("baking soda", False, "makes fizzy bubbles when it meets a sour drink like lemon juice",
         "a shaken soda bottle when you open it",
         "acid-base neutralization, carbon dioxide evolution and bicarbonate equilibria"),
    ),
}
# fmt: on

TOPICS: tuple[Topic, ...] = tuple(
    Topic(
        subject=subject,
        category=category.name,
        plural=plural,
        gist=gist,
        analogy=analogy,
        technical=technical,
    )
    for category in CATEGORIES
    for subject, plural, gist, analogy, technical in _SUBJECTS[category.name]
)

CATEGORY_BY_NAME: dict[str, Category] = {category.name: category for category in CATEGORIES}
