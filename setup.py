"""Package metadata is read from settings.ini (nbdev 2 layout); edit it there, not here."""
from configparser import ConfigParser
from pathlib import Path
import json, setuptools, shlex
from setuptools.command.build_py import build_py

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

cfg_keys = 'version description keywords author author_email'.split()
expected = cfg_keys + "lib_name user branch license status min_python audience language".split()
for o in expected: assert o in cfg, "missing expected setting: {}".format(o)
setup_cfg = {o: cfg[o] for o in cfg_keys}

licenses = {
    'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License'),
    'mit': ('MIT License', 'OSI Approved :: MIT License'),
}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable',
            '6 - Mature', '7 - Inactive']
py_versions = '3.9 3.10 3.11 3.12'.split()

requirements = shlex.split(cfg.get('requirements', ''))
if cfg.get('pip_requirements'): requirements += shlex.split(cfg.get('pip_requirements', ''))
min_python = cfg['min_python']
lic = licenses.get(cfg['license'].lower(), (cfg['license'], None))
dev_requirements = (cfg.get('dev_requirements') or '').split()

def without_outputs(text:str) -> str:
    """A notebook as the package ships it: every cell with its metadata (papermill's `parameters` tag), code cells without
    outputs. nbs/ commits them executed, as documents; papermill and Voila write their own outputs on every run."""
    nb = json.loads(text)
    for c in nb['cells']:
        if c['cell_type'] == 'code': c['outputs'], c['execution_count'] = [], None
    return json.dumps(nb, indent=1, ensure_ascii=False) + '\n'

class BuildPyWithNotebooks(build_py):
    """Copy the notebooks listed under `package_notebooks` in settings.ini (report templates, the Voila page) into the
    built package at `package_notebooks_dir`, without their outputs; they are edited in nbs/ only, and no copy is
    committed under trader/."""
    def run(self):
        super().run()
        dest = Path(self.build_lib)/cfg['package_notebooks_dir']
        self.mkpath(str(dest))
        for src in shlex.split(cfg.get('package_notebooks', '')):
            if not Path(src).is_file(): raise FileNotFoundError(f"package notebook {src} (settings.ini package_notebooks) is missing")
            (dest/Path(src).name).write_text(without_outputs(Path(src).read_text(encoding='utf-8')), encoding='utf-8')

setuptools.setup(
    name=cfg['lib_name'],
    license=lic[0],
    classifiers=[
        'Development Status :: ' + statuses[int(cfg['status'])],
        'Intended Audience :: ' + cfg['audience'].title(),
        'Natural Language :: ' + cfg['language'].title(),
    ] + ['Programming Language :: Python :: ' + o for o in py_versions[py_versions.index(min_python):]]
      + (['License :: ' + lic[1]] if lic[1] else []),
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=[cfg['lib_path'], cfg['lib_path'] + '.*']),
    include_package_data=True,
    install_requires=requirements,
    extras_require={'dev': dev_requirements},
    dependency_links=cfg.get('dep_links', '').split(),
    python_requires='>=' + cfg['min_python'],
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    cmdclass={'build_py': BuildPyWithNotebooks},
    entry_points={
        'console_scripts': cfg.get('console_scripts', '').split(),
        'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d'],
    },
    **setup_cfg)
