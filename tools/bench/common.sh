# Shared by the benchmark scripts (sourced; they define die()).

# Figures from anything but a release build mean nothing.
require_release_build() {  # require_release_build BUILD_DIR
  local info=$1/meson-info/intro-buildoptions.json type
  [[ -f $info ]] || return 0  # not configured yet: the caller builds it
  type=$(jq -r '.[] | select(.name == "buildtype") | .value' "$info")
  [[ $type == release ]] ||
    die "$1 is a $type build; benchmark a release build (meson setup --reconfigure $1 -Dbuildtype=release)"
}
